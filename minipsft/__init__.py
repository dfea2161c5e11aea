"""minipsft: Proximal Supervised Fine-Tuning (PSFT) in a few readable files.

The core, read in this order: losses.py (the losses on per-token log-probs), logprobs.py (those
log-probs from any causal LM, the plain way), train.py (the loop and its pi_old snapshot
schedule). Beside it: model.py, chat.py, speed.py, fused.py, lora.py, runs.py, data.py. The lab
(worlds, runner, ablations, claims, figures) is in lab/; cli.py and trl_trainer.py sit on top.
"""
from .errors import DataError
from .logprobs import heldout_eval, token_logprobs
from .losses import clipped_surrogate, dft_loss, psft_loss, sft_kl_loss, sft_loss
from .model import CausalLM
from .runs import RunFolder
from .train import METHODS, NonFiniteLossError, TrainConfig, train

__version__ = "0.1.0"
