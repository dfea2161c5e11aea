"""PSFT inside TRL's ``SFTTrainer``, for multi-GPU runs (usage, the official recipe's settings and
what is checked: docs/trl-and-scaling.md). Only the training loss changes: ``LOSSES["psft"]`` on
the completion tokens TRL masks, normalised as TRL's own loss, so ``refresh_steps=1`` is exactly
TRL's ``loss_type="nll"``.

pi_old is stored log-probs, not a model: at every ``refresh_steps``-th optimizer step (and the
first PSFT step) the trainer fetches the micro-batches of the coming steps up to the next refresh
(within the epoch) and scores those after the current step with the current weights (no grad,
dropout off); the current step's own forward is its log pi_old (ratio 1). ``global_step`` does not
move during gradient accumulation, so accumulation never changes which weights are pi_old. TRL
counts ``refresh_steps`` over the whole run where minipsft's loop restarts its batches each epoch:
both agree when the data set is a multiple of the batch (a window cut by an epoch's end refreshes
at the next epoch's first step). A resume refreshes pi_old at its first step: save checkpoints at
multiples of ``refresh_steps`` for an exact resume.
"""
from dataclasses import dataclass

import torch
from trl import SFTConfig, SFTTrainer

from .losses import LOSSES
from .train import setting

__all__ = ["PSFTConfig", "PSFTTrainer"]


@dataclass
class PSFTConfig(SFTConfig):
    """``SFTConfig`` plus PSFT's settings."""
    eps_low: float = setting(0.2, "lower clip of the ratio (never acts with PSFT's A = 1)")
    eps_high: float = setting(0.28, "upper clip: tokens whose ratio passed 1 + eps_high get no "
                                    "gradient (official 0.28)")
    refresh_steps: int = setting(8, "optimizer steps per pi_old snapshot (official batch 256 / "
                                    "minibatch 32 = 8); 1 is exactly SFT")
    sft_warmup_steps: int = setting(0, "plain-SFT optimizer steps before PSFT starts")

    def __post_init__(self):
        super().__post_init__()
        if self.refresh_steps < 1:
            raise ValueError(f"refresh_steps={self.refresh_steps}: must be >= 1")
        if self.sft_warmup_steps < 0 or not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError(f"need sft_warmup_steps >= 0, 0 <= eps_low < 1, eps_high >= 0 (got "
                             f"{self.sft_warmup_steps}, {self.eps_low}, {self.eps_high})")
        if self.loss_type != "nll":
            raise ValueError(f"loss_type={self.loss_type!r}: PSFTTrainer replaces the loss; "
                             "leave loss_type='nll'")
        if self.padding_free or self.packing:
            raise ValueError("PSFTTrainer needs padded batches (packing=False, padding_free=False)")


class PSFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` with the PSFT loss; logs ``clipfrac``, ``ratio_mean``, ``ratio_max``,
    ``approx_kl`` and ``entropy`` through the Trainer's logging."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, PSFTConfig):
            raise TypeError("PSFTTrainer needs a PSFTConfig as args, "
                            f"got {type(self.args).__name__}")
        self._snapshot_step = None  # the global_step at which pi_old was last taken
        self._window = []  # (micro-batches, num_items_in_batch) of the coming steps of this window
        self._cut = False  # whether an epoch's end cut the last window short
        self._window_source = None  # the epoch iterator the window's batches came from
        self._psft_sums = {}  # token-weighted sums of the PSFT diagnostics since the last log

    def log(self, logs: dict, start_time=None) -> None:
        if self.model.training and self._psft_sums.get("_tokens"):
            sums, self._psft_sums = self._psft_sums, {}
            n = sums.pop("_tokens")
            for k, v in sums.items():  # replaces TRL's per-micro-batch means; ratio_max is a max
                self._metrics["train"][k] = [v if k == "ratio_max" else v / n]
        super().log(logs, start_time)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step. At a refresh, those of the window's later steps
        are fetched too and scored with the current weights: their log pi_old."""
        step, args = self.state.global_step, self.args
        if self._window and self._window_source is epoch_iterator:
            return self._window.pop(0)
        self._window = []  # a window left from another epoch iterator (a stopped epoch) is stale
        # (only the training loop calls this, and before it puts the model in train mode)
        psft = step >= args.sft_warmup_steps
        # a snapshot: the first PSFT step, every refresh_steps-th step, and the step after a window
        # that an epoch's end cut short (its stored log-probs covered only that epoch's batches)
        due = self._snapshot_step is None or step % args.refresh_steps == 0 or self._cut
        if not (psft and due):
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        self._snapshot_step, self._cut = step, False
        steps = args.refresh_steps - step % args.refresh_steps
        window = [super().get_batch_samples(epoch_iterator, num_batches, device)]
        for _ in range(steps - 1):
            batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            if not batches:  # the epoch ended inside the window
                self._cut = True
                break
            window.append((self._score(batches), n_items))
        self._window, self._window_source = window[1:], epoch_iterator
        return window[0]

    @torch.no_grad()
    def _score(self, batches: list) -> list:
        """Each micro-batch with its log pi_old under the current weights (dropout off)."""
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        scored = []
        for batch in batches:
            inputs = self._prepare_inputs(batch)
            inputs["old_log_probs"] = model(**inputs, use_cache=False, fused_lm_head=True).log_probs
            scored.append(inputs)
        model.train(was_training)
        return scored

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args, step = self.args, self.state.global_step
        logp_old = inputs.pop("old_log_probs", None)
        if not model.training or step < args.sft_warmup_steps:  # eval loss and warm-up: plain NLL
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        mask, logp = outputs.label_mask, outputs.log_probs
        if logp_old is None:  # the snapshot's own step: its forward is log pi_old (ratio 1)
            logp_old = logp.detach()
        loss, metrics = LOSSES["psft"].loss(logp, mask, logp_old, None, args)
        # as TRL: the micro-batch's token sum over the whole optimizer step's tokens (all ranks)
        n_local = mask.sum()
        num_tokens = n_local if num_items_in_batch is None else num_items_in_batch
        loss = loss * n_local / torch.as_tensor(num_tokens).clamp(min=1)
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        # diagnostics, token-weighted over the micro-batches and ranks of a logging window (as ours)
        gather = self.accelerator.gather_for_metrics
        sums = {k: torch.as_tensor(metrics[k] * metrics["num_tokens"], device=n_local.device)
                for k in ("clipfrac", "ratio_mean", "approx_kl")}
        if outputs.entropy is not None:
            sums["entropy"] = (outputs.entropy.detach().float() * mask).sum()
        if outputs.is_top1 is not None:
            sums["mean_token_accuracy"] = (outputs.is_top1.float() * mask).sum()
        sums["_tokens"] = n_local.detach()
        for k, v in sums.items():
            self._psft_sums[k] = self._psft_sums.get(k, 0.0) + gather(v).sum().item()
        ratio_max = gather(torch.as_tensor(metrics["ratio_max"],
                                           device=n_local.device)).max().item()
        self._psft_sums["ratio_max"] = max(self._psft_sums.get("ratio_max", 0.0), ratio_max)
        self._total_train_tokens += (gather(inputs["attention_mask"].sum()).sum().item()
                                     // self._tp_size)
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
