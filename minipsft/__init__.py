"""minipsft: Proximal Supervised Fine-Tuning (PSFT) in a few readable files.

    losses.py  SFT, PSFT (the clipped surrogate with A = 1), DFT, SFT+KL on per-token log-probs
    model.py   a wrapper over a Hugging Face causal LM: encode, token log-probs/entropy, generate
    train.py   one loop for every method, with the pi_old snapshot schedule and checkpoints
    data.py    JSONL/Parquet data files in TRL's formats, checked row by row
    cli.py     ``python -m minipsft train ...``
"""
from .losses import clipped_surrogate, dft_loss, psft_loss, sft_kl_loss, sft_loss
from .model import CausalLM, DataError, token_logprobs
from .train import METHODS, NonFiniteLossError, TrainConfig, heldout_eval, train

__version__ = "0.1.0"
