"""PSFT inside TRL's ``SFTTrainer``: for multi-GPU runs on accelerate, DeepSpeed or FSDP.

``pip install "minipsft[trl]"``; importing ``minipsft`` itself never imports TRL.

    from minipsft.trl_trainer import PSFTConfig, PSFTTrainer
    args = PSFTConfig(output_dir="out", per_device_train_batch_size=4, gradient_accumulation_steps=8,
                      learning_rate=1e-6, eps_low=0.2, eps_high=0.28, refresh_steps=8)
    PSFTTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=dataset).train()

Everything TRL does is kept (data formats, chat templates, completion-only masks, packing off,
logging, checkpoints, accelerate/DeepSpeed/FSDP); only the training loss changes. The loss is
``minipsft.losses.psft_loss`` on the completion tokens TRL already masks (labels != -100),
normalised like TRL's own loss (summed over tokens, divided by the tokens of the whole optimizer
step across devices), so with ``refresh_steps=1`` it is exactly TRL's ``loss_type="nll"``.

**pi_old.** A frozen copy of the model, prepared with the accelerator exactly like TRL's reference
models (DeepSpeed engine, FSDP or DDP-free eval model, so it shards like the trained model). Its
weights are overwritten with the current ones at the first micro-batch of every optimizer step
whose number is a multiple of ``refresh_steps`` (TRL's ``SyncRefModelCallback.sync_target_model``
with alpha 1, which also handles ZeRO-3). ``global_step`` does not move during gradient
accumulation, so accumulation never changes which weights count as pi_old: pi_old is always the
weights of ``global_step % refresh_steps`` optimizer steps ago. On a refresh step the ratio is 1,
and the current forward is reused as log pi_old (no extra forward).

**Cost.** Memory: one more copy of the model weights in the training dtype (no gradients, no
optimizer state; sharded under ZeRO-3/FSDP), e.g. +1 GB for a 0.5B model in bf16, +15 GB (split over
the GPUs) for 7B. Time: one extra no-grad forward per micro-batch on the ``refresh_steps - 1``
steps of each window that are not refresh steps (about a third of a step each), plus one weight
copy per window. Measured (``benchmarks/trl_psft_overhead.py``, CPU, tiny model, 8 steps per
snapshot): PSFTTrainer/SFTTrainer step time 1.21 (median of 3 alternating runs; 1.09-1.35 per run),
in line with minipsft's own loop on one H200 (PSFT/SFT 1.23 eager). Not measured on GPUs.

Settings mapped to the official recipe (batch 256, minibatch 32, eps 0.2/0.28, lr 1e-6): make
``per_device_train_batch_size x gradient_accumulation_steps x num_processes = 32`` (the minibatch)
and ``refresh_steps = 256 / 32 = 8``. Note that TRL counts ``refresh_steps`` in optimizer steps over
the whole run, while minipsft's loop restarts its batches at each epoch: both agree when the data
set size is a multiple of the batch. Resuming from a checkpoint refreshes pi_old at the first step
after the resume; save checkpoints at multiples of ``refresh_steps`` for an exact resume.
"""
import copy
from dataclasses import dataclass, field

import torch
from trl import SFTConfig, SFTTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import add_fused_lm_head

from .losses import psft_loss

__all__ = ["PSFTConfig", "PSFTTrainer"]


@dataclass
class PSFTConfig(SFTConfig):
    """``SFTConfig`` plus PSFT's settings."""
    eps_low: float = field(default=0.2, metadata={"help": "lower clip of the ratio (never acts with PSFT's A = 1)"})
    eps_high: float = field(default=0.28, metadata={"help": "upper clip: tokens whose ratio passed 1 + eps_high get "
                                                            "no gradient (official 0.28)"})
    refresh_steps: int = field(default=8, metadata={"help": "optimizer steps per pi_old snapshot (official batch "
                                                            "256 / minibatch 32 = 8); 1 is exactly SFT"})
    sft_warmup_steps: int = field(default=0, metadata={"help": "plain-SFT optimizer steps before PSFT starts"})

    def __post_init__(self):
        super().__post_init__()
        if self.refresh_steps < 1:
            raise ValueError(f"refresh_steps={self.refresh_steps}: must be >= 1")
        if self.sft_warmup_steps < 0 or not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError(f"need sft_warmup_steps >= 0, 0 <= eps_low < 1, eps_high >= 0 (got "
                             f"{self.sft_warmup_steps}, {self.eps_low}, {self.eps_high})")
        if self.loss_type != "nll":
            raise ValueError(f"loss_type={self.loss_type!r}: PSFTTrainer replaces the loss; leave loss_type='nll'")
        if self.padding_free or self.packing:
            raise ValueError("PSFTTrainer needs padded batches (packing=False, padding_free=False)")


class PSFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` with the PSFT loss and a pi_old snapshot refreshed every ``refresh_steps``
    optimizer steps (see the module docstring for what it costs). Logs ``clipfrac``, ``ratio_mean``,
    ``ratio_max``, ``approx_kl`` and ``entropy`` through the Trainer's normal logging."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, PSFTConfig):
            raise TypeError(f"PSFTTrainer needs a PSFTConfig as args, got {type(self.args).__name__}")
        if getattr(self.model, "peft_config", None):
            raise NotImplementedError("PSFTTrainer does not support PEFT models yet: the snapshot would have to "
                                      "copy the adapter weights only")
        old = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval()
        old.requires_grad_(False)
        add_fused_lm_head(old)  # log-probs of the labels without the [B, T, vocab] logits
        if self.is_deepspeed_enabled:
            old = prepare_deepspeed(old, self.accelerator)
        elif self.is_fsdp_enabled:
            old = prepare_fsdp(old, self.accelerator)
        else:
            old = self.accelerator.prepare_model(old, evaluation_mode=True)
        self.old_model = old
        self._snapshot_step = None  # the global_step at which pi_old was last refreshed
        self._psft_sums = {}  # token-weighted sums of the PSFT diagnostics since the last log

    def log(self, logs: dict, start_time=None) -> None:
        if self.model.training and self._psft_sums.get("_tokens"):
            n = self._psft_sums.pop("_tokens")
            ratio_max = self._psft_sums.pop("ratio_max")
            for k, v in self._psft_sums.items():
                self._metrics["train"][k] = [v / n]  # replaces TRL's per-micro-batch entropy/accuracy means
            self._metrics["train"]["ratio_max"] = [ratio_max]
            self._psft_sums = {}
        super().log(logs, start_time)

    def _refresh_pi_old(self):
        SyncRefModelCallback.sync_target_model(self.accelerator.unwrap_model(self.model),
                                               self.accelerator.unwrap_model(self.old_model), alpha=1.0)
        self._snapshot_step = self.state.global_step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args, step = self.args, self.state.global_step
        if not model.training or step < args.sft_warmup_steps:  # eval loss and warm-up: plain NLL
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        refresh = self._snapshot_step is None or (step % args.refresh_steps == 0 and self._snapshot_step != step)
        if refresh:
            self._refresh_pi_old()
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        mask = outputs.label_mask
        logp = outputs.log_probs
        if self._snapshot_step == step:  # ratio 1 on the snapshot's own step: its forward is log pi_old
            logp_old = logp.detach()
        else:
            with torch.no_grad():
                logp_old = self.old_model(**inputs, fused_lm_head=True).log_probs
        loss, metrics = psft_loss(logp, logp_old, mask, args.eps_low, args.eps_high)
        # TRL's normalisation: token sum over the micro-batch / tokens of the whole optimizer step (all ranks)
        n_local = mask.sum()
        num_tokens = n_local if num_items_in_batch is None else num_items_in_batch
        loss = loss * n_local / torch.as_tensor(num_tokens).clamp(min=1)
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        # diagnostics, token-weighted over the micro-batches and ranks of each logging window (as minipsft's loop)
        gather = self.accelerator.gather_for_metrics
        sums = {"clipfrac": metrics["clipfrac"], "ratio_mean": metrics["ratio_mean"], "approx_kl": metrics["approx_kl"]}
        sums = {k: torch.as_tensor(v * metrics["num_tokens"], device=n_local.device) for k, v in sums.items()}
        if outputs.entropy is not None:
            sums["entropy"] = (outputs.entropy.detach().float() * mask).sum()
        if outputs.is_top1 is not None:
            sums["mean_token_accuracy"] = (outputs.is_top1.float() * mask).sum()
        for k, v in sums.items():
            self._psft_sums[k] = self._psft_sums.get(k, 0.0) + gather(v).sum().item()
        self._psft_sums["_tokens"] = self._psft_sums.get("_tokens", 0.0) + gather(n_local.detach()).sum().item()
        ratio_max = gather(torch.as_tensor(metrics["ratio_max"], device=n_local.device)).max().item()
        self._psft_sums["ratio_max"] = max(self._psft_sums.get("ratio_max", 0.0), ratio_max)
        self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
