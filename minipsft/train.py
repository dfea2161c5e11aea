"""One training loop for every loss in ``losses.LOSSES``, with the official ``pi_old`` schedule.

Schedule (the official verl recipe): the data are shuffled once per epoch (the order depends only
on ``seed`` and the epoch: every method sees the same demonstrations) and cut into batches of
``batch_size``. For PSFT, the weights at the start of each batch are frozen as ``pi_old`` (its
log-probs computed under no grad); the batch is cut into minibatches of ``minibatch_size``, one
optimizer step each, so ``pi_old`` is refreshed every ``batch_size / minibatch_size`` steps. At a
snapshot's own step the ratio is exactly 1 and PSFT's gradient *is* SFT's. The loop knows no task,
file or GPU trick: the outside reaches it through ``eval_fn`` and a ``Run`` (``runs.RunFolder``).
"""
import math
import time
from dataclasses import dataclass, field

import torch

from .losses import LOSSES, Loss, masked_mean

__all__ = ["TrainConfig", "TrainState", "Run", "Objective", "train", "setting", "METHODS",
           "NonFiniteLossError", "adamw", "chunks", "merge_metrics", "token_weights",
           "epoch_batches", "lr_lambda"]

METHODS = tuple(LOSSES)  # one per registered loss (losses.LOSSES)
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")


def setting(default, help: str):
    """A config field with its help text beside it (also its ``--help`` line)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; each field's help text is also its ``--help`` line."""
    method: str = setting("psft", f"loss: {' | '.join(LOSSES)} (losses.LOSSES; one loop, one data "
                                  "order: only the loss differs)")
    epochs: int = setting(4, "passes over the data set")
    lr: float = setting(1e-5, "peak AdamW learning rate (official: PSFT 1e-6, SFT baseline 2e-5)")
    batch_size: int = setting(256, "demonstrations per pi_old snapshot (official 256); log pi_old "
                                   "is computed once per batch")
    minibatch_size: int = setting(32, "demonstrations per optimizer step (official 32): batch_size/"
                                      "minibatch_size steps per snapshot (1: PSFT is exactly SFT)")
    micro_batch_size: int = setting(0, "demonstrations per forward/backward, gradients accumulated "
                                       "(less memory, same result); 0 = the whole minibatch")
    eps_low: float = setting(0.2, "lower clip, ratio >= 1-eps_low (never acts when the advantage "
                                  "is positive)")
    eps_high: float = setting(0.28, "upper clip, ratio <= 1+eps_high (DAPO's clip-higher, as the "
                                    "official code); a huge value turns the clip off")
    refresh_pi_old: bool = setting(True, "refresh pi_old at every batch; off anchors pi_old to the "
                                         "starting model (the paper's 'no update' ablation)")
    sft_warmup_steps: int = setting(0, "plain-SFT optimizer steps before PSFT starts")
    length_bucketing: bool = setting(False, "within each batch, group demonstrations of similar "
                                            "length into the same minibatch (less padding; same "
                                            "batches and snapshots for every method)")
    kl_coef: float = setting(0.5, "weight of sft_kl's k3 penalty on the demonstration tokens "
                                  "(paper: 0.5)")
    vocab_kl_coef: float = setting(0.1, "weight of the whole-vocabulary KL(pi_ref || pi) of asft "
                                        "and sft_kl_vocab (the ASFT code's default: 0.1)")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)")
    lr_warmup_steps: int = setting(0, "linear learning-rate warm-up, in optimizer steps")
    lr_warmup_batches: int = setting(0, "linear lr warm-up in batches (the official verl recipe): "
                                        "batch b < N trains at lr * b / N (the first at 0)")
    loss_aggregation: str = setting("token_mean", "token_mean: every completion token of a "
                                     "minibatch weighs the same (TRL's DAPO/BNPO); "
                                     "seq_mean_token_mean: every demonstration's token-mean weighs "
                                     "the same (the official 8-GPU run)")
    lr_schedule: str = setting("constant", "after warm-up: constant | cosine (down to 0 at the "
                                           "last step)")
    seed: int = setting(0, "seed of the data order and of torch's RNG")
    eval_every: int = setting(0, "also evaluate every N optimizer steps (always: at the start and "
                                 "after each epoch)")
    checkpoint_every: int = setting(0, "with an output folder, save a resumable checkpoint every N "
                                       "batches (always after each epoch)")
    progress: bool = setting(True, "show a tqdm progress bar (runs.Progress or runs.RunFolder)")

    def check(self) -> None:
        """Refuse settings that cannot run, naming the setting."""
        if self.method not in LOSSES:  # the registry as it is now (a loss may be added at run time)
            raise ValueError(f"method={self.method!r}: choose one of {', '.join(LOSSES)}")
        for name in ("epochs", "batch_size", "minibatch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.minibatch_size > self.batch_size:
            raise ValueError(f"minibatch_size={self.minibatch_size} is larger than "
                             f"batch_size={self.batch_size}")
        if self.lr <= 0 or self.eps_low < 0 or self.eps_high < 0 or self.eps_low >= 1:
            raise ValueError(f"need lr > 0, 0 <= eps_low < 1, eps_high >= 0 (got lr={self.lr}, "
                             f"eps_low={self.eps_low}, eps_high={self.eps_high})")
        if self.loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"loss_aggregation={self.loss_aggregation!r}: choose "
                             f"{' or '.join(AGGREGATIONS)}")
        if self.lr_warmup_steps and self.lr_warmup_batches:
            raise ValueError("lr_warmup_steps and lr_warmup_batches: set one of the two")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: choose constant or cosine")
        if min(self.micro_batch_size, self.sft_warmup_steps, self.lr_warmup_steps, self.eval_every,
               self.lr_warmup_batches, self.checkpoint_every, self.grad_clip, self.kl_coef,
               self.vocab_kl_coef) < 0:
            raise ValueError("step counts, sizes, grad_clip and the KL weights must be >= 0")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is left untouched."""


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint saves and a resume restores."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    epoch: int = 0  # the next batch to train on is batch `batch` of epoch `epoch`
    batch: int = 0
    step: int = 0  # optimizer steps taken
    history: list = field(default_factory=list)  # one record per optimizer step
    evals: list = field(default_factory=list)  # one record per evaluation


class Run:
    """The loop's window to the outside; this one does nothing (``runs.RunFolder``: a folder)."""

    def start(self, lm, cfg, state: TrainState) -> bool:
        """Before the first step; True when it restored ``state`` (a resume)."""
        return False

    def on_step(self, state: TrainState, record: dict) -> None:
        """After every optimizer step."""

    def on_batch_end(self, lm, state: TrainState) -> None:
        """After every batch (a checkpoint may be taken here)."""

    def on_stop(self, lm, state: TrainState, error: BaseException | None) -> None:
        """When the loop ends, finished (``error`` None) or not."""


def epoch_batches(n: int, cfg: TrainConfig, epoch: int) -> list:
    """Example indices of each batch of ``epoch``: a permutation that depends on (seed, epoch)
    only, so every method and batch size sees the same order."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return chunks(order, cfg.batch_size)


def chunks(seq, size) -> list:
    """``seq`` cut into consecutive pieces of ``size`` (the last may be shorter)."""
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def lr_lambda(cfg: TrainConfig, total_steps: int, batch_of_step=None):
    """The lr factor after ``step`` optimizer steps. ``batch_of_step[step]``: the (run-wide) batch
    that step belongs to, for a warm-up counted in batches."""
    batch_of_step = batch_of_step or [0] * total_steps
    warm = cfg.lr_warmup_steps  # steps before the schedule proper
    if cfg.lr_warmup_batches:
        warm = sum(b < cfg.lr_warmup_batches for b in batch_of_step)

    def f(step):  # step = optimizer steps taken so far
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        batch = batch_of_step[min(step, len(batch_of_step) - 1)]
        if batch < cfg.lr_warmup_batches:  # the official recipe's: per batch, the first at 0
            return batch / cfg.lr_warmup_batches
        if cfg.lr_schedule == "cosine":
            done = (step - warm) / max(1, total_steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
        return 1.0
    return f


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; on a GPU its fused kernel (one launch updates every tensor; the same math)."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=all(p.is_cuda for p in params) or None)


def new_state(model, n_examples: int, cfg: TrainConfig) -> TrainState:
    """A fresh optimizer and lr schedule over the whole run, at step 0."""
    opt = adamw([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    steps_in_batch = [math.ceil(len(b) / cfg.minibatch_size)
                      for b in epoch_batches(n_examples, cfg, 0)]
    batch_of_step = [b for b, k in enumerate(steps_in_batch * cfg.epochs) for _ in range(k)]
    schedule = lr_lambda(cfg, len(batch_of_step), batch_of_step)
    return TrainState(opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule), sum(steps_in_batch))


def token_weights(mask, aggregation: str = "token_mean"):
    """Per-token weights of a minibatch's loss: the completion mask (token-mean), or the mask
    divided by each row's completion length (``seq_mean_token_mean``: the mean over
    demonstrations of their token-means, as verl's token-mean per one-sequence micro-batch)."""
    weights = mask.float()
    if aggregation == "seq_mean_token_mean":
        weights = weights / weights.sum(1, keepdim=True).clamp(min=1.0)
    return weights


def merge_metrics(parts: list) -> dict:
    """Token-weighted mean of per-micro-batch metrics (max for ``*_max``, sum for counts)."""
    total = sum(p["num_tokens"] for p in parts)
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        if k in ("num_tokens", "tokens"):
            out[k] = sum(vals)
        elif k.endswith("_max"):
            out[k] = max(vals)
        else:
            out[k] = sum(v * p["num_tokens"] for v, p in zip(vals, parts)) / total
    return out


def train(lm, examples: list, cfg: TrainConfig, *, eval_fn=None, on_step=None, token_hook=None,
          run: Run | None = None) -> dict:
    """Fine-tune ``lm`` in place on encoded ``examples``; return ``{"history", "evals"}``: a record
    per optimizer step (loss, nll, entropy, clipfrac, ratio stats, grad_norm, lr, ...) and one per
    evaluation. ``on_step(record)`` runs after every step; ``token_hook(micro_batch, logp,
    logp_old)`` on every snapshot loss's forward (e.g. which tokens the clip stops)."""
    cfg.check()
    if not examples:
        raise ValueError("no training examples")
    run = run or Run()
    torch.manual_seed(cfg.seed)
    loss = LOSSES[cfg.method]
    # the starting weights, frozen: pi_ref, or pi_old when the snapshot is never refreshed
    anchored = loss.reference or loss.vocab_kl or (loss.snapshot and not cfg.refresh_pi_old)
    starting = lm.reference() if anchored else None
    state = new_state(lm.model, len(examples), cfg)
    if not run.start(lm, cfg, state):
        evaluate(lm, eval_fn, state, 0)
    lm.model.train()

    def after_step(record):
        run.on_step(state, record)
        if on_step is not None:
            on_step(record)
        if cfg.eval_every and state.step % cfg.eval_every == 0:
            evaluate(lm, eval_fn, state, state.step / state.steps_per_epoch)

    try:
        while state.epoch < cfg.epochs:
            batches = epoch_batches(len(examples), cfg, state.epoch)
            order = batches[state.batch]
            if cfg.length_bucketing:
                order = sorted(order, key=lambda i: len(examples[i]["input_ids"]))
            minibatches = [lm.collate([examples[i] for i in idx])
                           for idx in chunks(order, cfg.minibatch_size)]
            train_batch(lm, cfg, state, minibatches, starting, token_hook, after_step)
            state.batch += 1
            if state.batch == len(batches):
                state.epoch, state.batch = state.epoch + 1, 0
                evaluate(lm, eval_fn, state, state.epoch)
            run.on_batch_end(lm, state)
    except BaseException as e:
        run.on_stop(lm, state, e)
        raise
    run.on_stop(lm, state, None)
    return {"history": state.history, "evals": state.evals}


def evaluate(lm, eval_fn, state: TrainState, epoch: float) -> None:
    if eval_fn is not None:
        was_training = lm.model.training
        lm.model.eval()
        state.evals.append({"step": state.step, "epoch": epoch, **eval_fn(lm)})
        lm.model.train(was_training)


def train_batch(lm, cfg, state, minibatches, starting, token_hook, after_step) -> None:
    """One batch: one optimizer step per minibatch, ``pi_old`` frozen at the batch's first step
    of a snapshot loss (``snapshot[j]``: minibatch j's log pi_old; ``None``: the weights at j's
    own step, whose log-probs are the training forward's, ratio 1)."""
    snapshot = None
    for j, mb in enumerate(minibatches):
        method = cfg.method
        if LOSSES[method].snapshot and state.step < cfg.sft_warmup_steps:  # plain SFT first
            method = "sft"
        if LOSSES[method].snapshot and cfg.refresh_pi_old and snapshot is None:
            snapshot = take_snapshot(lm, minibatches, j, cfg)
        logp_old = snapshot[j] if snapshot is not None else None
        record = optimizer_step(lm, cfg, state, mb, method, logp_old, starting, token_hook)
        state.step += 1
        record.update(step=state.step, epoch=state.epoch + 1,
                      epoch_frac=state.step / state.steps_per_epoch)
        state.history.append(record)
        after_step(record)


def take_snapshot(lm, minibatches, j: int, cfg) -> list:
    """Freeze the current weights as pi_old for minibatch ``j`` and the batch's later ones: their
    log-probs now, one no-grad forward each (``None`` for ``j`` itself: its training forward is
    taken with these very weights)."""
    was_training = lm.model.training
    lm.model.eval()  # dropout off (LoRA dropout, say): pi_old is the weights, not a dropout sample
    logps = [None] * len(minibatches)
    with torch.no_grad():
        for k in range(j + 1, len(minibatches)):
            micros = micro_batches(minibatches[k], cfg)
            logps[k] = torch.cat([lm.token_logprobs(micro)[0] for _, micro in micros])
    lm.model.train(was_training)
    return logps


def micro_batches(mb: dict, cfg) -> list:
    """(rows, tensors) of the slices of a minibatch run through forward/backward one at a time."""
    size = cfg.micro_batch_size or len(mb["input_ids"])
    return [(slice(s, s + size), {k: v[s:s + size] for k, v in mb.items()})
            for s in range(0, len(mb["input_ids"]), size)]


@dataclass
class Objective:
    """One micro-batch's loss as a function of its log-probs: a registered loss with its token
    weights, pi_old and pi_ref."""
    loss: Loss
    cfg: TrainConfig
    weights: torch.Tensor  # per-token weights of the loss (token_weights): 0 off the completion
    logp_old: torch.Tensor | None  # log pi_old; None: pi_old is these very weights (ratio 1)
    logp_ref: torch.Tensor | None  # log pi_ref, the starting weights, when the loss needs it
    reference: object = None  # model.Reference, the frozen starting weights: a vocab_kl loss's KL

    def __call__(self, logp, kl=None):
        """The loss and its metrics; ``kl``: KL(pi_ref || pi) per position (a vocab_kl loss)."""
        if self.loss.vocab_kl and kl is None:
            raise ValueError(f"{self.cfg.method!r} needs kl, KL(pi_ref || pi) per position")
        old = logp.detach() if self.logp_old is None else self.logp_old
        ref = kl if self.loss.vocab_kl else self.logp_ref
        return self.loss.loss(logp, self.weights, old, ref, self.cfg)


def optimizer_step(lm, cfg, state, mb, method, logp_old, starting, token_hook) -> dict:
    """One optimizer step on minibatch ``mb``: gradients accumulated over its micro-batches."""
    t0 = time.perf_counter()
    loss = LOSSES[method]
    weights = token_weights(mb["completion_mask"], cfg.loss_aggregation)
    parts = []
    for rows, micro in micro_batches(mb, cfg):
        anchored = starting is not None and method != "sft"  # the starting weights, frozen
        ref = starting.logprobs(micro) if anchored and not loss.vocab_kl else None
        old = logp_old[rows] if logp_old is not None else None
        if loss.snapshot and not cfg.refresh_pi_old:
            old = ref  # the 'no update' ablation: pi_old is the starting model
        objective = Objective(loss, cfg, weights[rows], old, ref, starting if anchored else None)
        parts.append(micro_step(lm, objective, micro, weights.sum(), token_hook, state.step))
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(lm.model.parameters(), clip).item()
    if not math.isfinite(grad_norm):
        state.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"non-finite gradient norm at step {state.step + 1}")
    lr = state.optimizer.param_groups[0]["lr"]  # what this step uses (also after a resume)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    record = merge_metrics(parts)
    record.setdefault("clipfrac", 0.0)  # no clip in this loss: nothing was clipped
    for k in ("clipfrac_high", "clipfrac_low", "ratio_mean", "ratio_max", "approx_kl", "kl"):
        record.setdefault(k, None)
    record.update(method=method, grad_norm=grad_norm, lr=lr,
                  pad_frac=1.0 - record["tokens"] / mb["input_ids"].numel(),
                  tokens_per_s=record["tokens"] / (time.perf_counter() - t0))
    return record


def micro_step(lm, objective: Objective, micro, total_weight, token_hook, step: int) -> dict:
    """Forward, loss and backward of one micro-batch (its gradient weighted by its share of the
    minibatch's loss weight, so micro-batches sum to the whole minibatch's gradient)."""
    if objective.loss.vocab_kl:  # whole next-token distributions against pi_ref's
        logp, entropy, kl = lm.token_logprobs_kl(micro, objective.reference)
        loss, metrics = objective(logp, kl)
    elif lm.fused_head:  # a speed path (fused.py): the same loss, its gradient in the forward
        loss, logp, entropy, metrics = lm.fused_loss(micro, objective)
    else:
        logp, entropy = lm.token_logprobs(micro, with_entropy=True)
        loss, metrics = objective(logp)
    if token_hook is not None and objective.loss.snapshot:
        old = objective.logp_old
        token_hook(micro, logp.detach(), logp.detach() if old is None else old)
    m = micro["completion_mask"].to(logp.dtype)  # NLL and entropy: plain token-means
    stats = torch.stack([loss.detach(), masked_mean(-logp.detach(), m), masked_mean(entropy, m),
                         micro["attention_mask"].sum().to(logp.dtype)])
    loss_value, nll, mean_entropy, tokens = stats.tolist()  # one host sync for all four
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"non-finite loss ({loss_value}) at step {step + 1}")
    (loss * (objective.weights.sum() / total_weight)).backward()
    return {**metrics, "loss": loss_value, "nll": nll, "entropy": mean_entropy,
            "tokens": int(tokens)}
