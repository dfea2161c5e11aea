"""minipsft: Proximal Supervised Fine-Tuning (PSFT) in a few readable files. The core, read in
this order: losses.py, logprobs.py, train.py; beside it model.py, chat.py, speed.py, fused.py,
lora.py, runs.py, data.py; the lab in lab/; cli.py and trl_trainer.py on top (README: reading
order)."""
from .errors import DataError
from .logprobs import heldout_eval, token_logprobs
from .losses import clipped_surrogate, dft_loss, psft_loss, sft_kl_loss, sft_loss
from .model import CausalLM
from .runs import RunFolder
from .train import METHODS, NonFiniteLossError, TrainConfig, train

__version__ = "0.1.0"
