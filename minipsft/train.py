"""One training loop for SFT, PSFT, DFT and SFT+KL, with the official ``pi_old`` snapshot schedule.

Schedule (as in the official verl recipe): the data are shuffled once per epoch (the order depends
only on ``seed`` and the epoch, so every method sees the same sequence of demonstrations) and cut
into batches of ``batch_size``. For PSFT, the current weights are frozen as ``pi_old`` at the start
of each batch and its log-probs computed under no grad; then the batch is cut into minibatches of
``minibatch_size`` and the model takes one optimizer step per minibatch. So ``pi_old`` is refreshed
every ``batch_size / minibatch_size`` steps. With one step per snapshot the ratio is exactly 1 at
that step and PSFT's gradient *is* SFT's: the clip only acts from the second minibatch on.

The loop knows no task: it takes encoded examples (``CausalLM.encode``) and an optional
``eval_fn(lm) -> dict`` called at the start, after every epoch and every ``eval_every`` steps.
"""
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .logprobs import heldout_eval  # noqa: F401
from .losses import LOSSES, masked_mean

__all__ = ["TrainConfig", "train", "heldout_eval", "summarize", "METHODS", "NonFiniteLossError"]

METHODS = tuple(LOSSES)  # one per registered loss (losses.LOSSES)
# keys that may differ when resuming (they do not change the result)
_RESUME_FREE = {"progress", "eval_every", "checkpoint_every"}
# keys that may differ with a warning (e.g. a lower lr after a NaN stop): same data, same schedule
# of snapshots, but no longer the uninterrupted run
RESUME_CHANGEABLE = ("lr", "grad_clip")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")
# what a run writes into its output folder (what --overwrite removes)
RUN_FILES = ("history.jsonl", "evals.jsonl", "config.json", "checkpoint.pt", "checkpoint.tmp",
             "summary.json", "final", "merged")


def setting(default, help: str):
    """A config field with its help text beside it (also its ``--help`` line)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run. The help text of each field is also its ``--help``
    line."""
    method: str = setting("psft", f"loss: {' | '.join(LOSSES)} (losses.LOSSES; one loop, one data "
                                  "order: only the loss differs)")
    epochs: int = setting(4, "passes over the data set")
    lr: float = setting(1e-5, "peak AdamW learning rate (official: PSFT 1e-6, their SFT baseline "
                              "2e-5)")
    batch_size: int = setting(256, "demonstrations per pi_old snapshot (official 256); log pi_old "
                                   "is computed once per batch")
    minibatch_size: int = setting(32, "demonstrations per optimizer step (official 32): "
                                      "batch_size/minibatch_size "
                                 "steps per snapshot; equal to batch_size, PSFT is exactly SFT")
    micro_batch_size: int = setting(0, "demonstrations per forward/backward within a minibatch, "
                                       "gradients accumulated "
                                  "(saves memory, same result); 0 = the whole minibatch at once")
    eps_low: float = setting(0.2, "lower clip, ratio >= 1-eps_low (never acts when the advantage "
                                  "is positive)")
    eps_high: float = setting(0.28, "upper clip, ratio <= 1+eps_high (DAPO's clip-higher, as the "
                                    "official code); "
                               "a huge value turns the clip off")
    refresh_pi_old: bool = setting(True, "refresh pi_old at every batch; off anchors pi_old to the "
                                         "starting model "
                                    "(the paper's 'no update' ablation)")
    sft_warmup_steps: int = setting(0, "plain-SFT optimizer steps before PSFT starts")
    length_bucketing: bool = setting(False, "within each batch, group demonstrations of similar "
                                            "length into the same minibatch (less padding; same "
                                            "batches and snapshots for every method)")
    kl_coef: float = setting(0.5, "weight of the KL(pi || pi_ref) penalty of sft_kl (paper: 0.5)")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)")
    lr_warmup_steps: int = setting(0, "linear learning-rate warm-up, in optimizer steps")
    lr_warmup_batches: int = setting(0, "linear lr warm-up counted in batches, as the official "
                                        "verl recipe: batch b < N trains at lr * b / N (the "
                                        "first at 0)")
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
                                       "batches "
                                  "(always after each epoch)")
    progress: bool = setting(True, "show a tqdm progress bar")

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
        if min(self.micro_batch_size, self.sft_warmup_steps, self.lr_warmup_steps,
               self.lr_warmup_batches, self.eval_every,
               self.checkpoint_every) < 0 or self.grad_clip < 0 or self.kl_coef < 0:
            raise ValueError("step counts, sizes, grad_clip and kl_coef must be >= 0")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is left untouched."""


def _epoch_batches(n: int, cfg: TrainConfig, epoch: int) -> list:
    """Example indices of each batch of ``epoch``: a permutation that depends on (seed, epoch)
    only."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]


def chunks(seq, size) -> list:
    """``seq`` cut into consecutive pieces of ``size`` (the last may be shorter)."""
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def _micro_batches(mb: dict, cfg) -> list:
    """Row slices of a minibatch that are run through forward/backward one at a time."""
    size = cfg.micro_batch_size or len(mb["input_ids"])
    return [(s, {k: v[s:s + size] for k, v in mb.items()})
            for s in range(0, len(mb["input_ids"]), size)]


def _partly_frozen(model) -> bool:
    return not all(p.requires_grad for p in model.parameters())


def _model_state(model) -> dict:
    """What a checkpoint keeps of the model: every tensor, or only the trainable ones when part
    of the model is frozen (LoRA: the adapter, not a second copy of the base)."""
    if not _partly_frozen(model):
        return model.state_dict()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _lr_lambda(cfg: TrainConfig, total_steps: int, batch_of_step=None):
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


def _loss(method, cfg, logp, mask, logp_old, logp_ref):
    return LOSSES[method].loss(logp, mask, logp_old, logp_ref, cfg)


def _token_terms(method, cfg, logp_old, logp_ref):
    """``terms(logp, cols)``: the per-token terms of ``method``'s loss for the target positions
    ``cols`` (what ``model.fused_head_loss`` differentiates chunk by chunk; the token-mean of these
    terms is ``_loss``). ``logp_old=None`` is a snapshot taken with these very weights (ratio 1)."""
    def terms(logp, cols):
        old = logp.detach() if logp_old is None else logp_old[:, 1:][:, cols]
        ref = None if logp_ref is None else logp_ref[:, 1:][:, cols]
        return LOSSES[method].terms(logp, old, ref, cfg)
    return terms


def _rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; on a GPU its fused kernel (one launch updates every tensor; the same math, a few ms
    less per step)."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=all(p.is_cuda for p in params) or None)


def train(lm, examples: list, cfg: TrainConfig, out_dir=None, eval_fn=None, resume: bool = False,
          on_step=None, token_hook=None, overwrite: bool = False) -> dict:
    """Fine-tune ``lm`` in place on encoded ``examples``; return
    ``{"history": [...], "evals": [...]}``.

    ``history`` has one record per optimizer step (``step``, ``epoch``, ``loss``, ``nll``,
    ``entropy``, ``clipfrac``, ratio stats, ``approx_kl``, ``grad_norm``, ``lr``, ``tokens_per_s``,
    ...); ``evals`` one per evaluation. With ``out_dir``: ``history.jsonl``, ``evals.jsonl``,
    ``config.json``, ``checkpoint.pt`` (model, optimizer, scheduler, RNG states, data position) and
    ``final/`` (``save_pretrained``). ``resume=True`` continues from ``out_dir/checkpoint.pt`` and
    gives the same result as an uninterrupted run (resuming with another ``lr`` or ``grad_clip``,
    e.g. lower after a NaN stop, is allowed with a warning). An ``out_dir`` that already holds a run
    is refused unless ``resume`` or ``overwrite``. ``on_step(record)`` is called after every step;
    ``token_hook(micro_batch, logp, logp_old)`` on every PSFT forward (per-token diagnostics, e.g.
    which tokens the clip stops).
    """
    cfg.check()
    if not examples:
        raise ValueError("no training examples")
    model = lm.model
    out = Path(out_dir) if out_dir is not None else None
    torch.manual_seed(cfg.seed)
    # a frozen copy of the *starting* weights: pi_ref for sft_kl, or pi_old when it is never
    # refreshed
    loss = LOSSES[cfg.method]
    anchored = loss.reference or (loss.snapshot and not cfg.refresh_pi_old)
    starting = lm.frozen_logprobs() if anchored else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, cfg.lr, cfg.weight_decay)
    batch_sizes = [len(b) for b in _epoch_batches(len(examples), cfg, 0)]
    steps_per_epoch = sum(math.ceil(n / cfg.minibatch_size) for n in batch_sizes)
    total_steps = steps_per_epoch * cfg.epochs
    steps_in_batch = [math.ceil(n / cfg.minibatch_size) for n in batch_sizes] * cfg.epochs
    batch_of_step = [b for b, k in enumerate(steps_in_batch) for _ in range(k)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total_steps, batch_of_step))
    pos = {"epoch": 0, "batch": 0, "step": 0}
    history, evals = [], []
    ckpt_path = out / "checkpoint.pt" if out is not None else None

    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run or replace it")
    holds_run = out is not None and any((out / f).exists() for f in RUN_FILES)
    if holds_run and not (resume or overwrite):
        raise FileExistsError(f"{out} already holds a run: pass resume=True (--resume) to continue "
                              "it or overwrite=True (--overwrite) to replace it")
    if holds_run and overwrite:  # nothing of the old run may survive into the new one
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise FileNotFoundError(f"resume=True but there is no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, map_location=lm.device, weights_only=False)
        diff = {k for k in ck["config"] if ck["config"][k] != getattr(cfg, k)} - _RESUME_FREE
        refused = sorted(diff - set(RESUME_CHANGEABLE))
        if refused:
            raise ValueError(f"cannot resume: settings differ from the checkpoint's: {refused} "
                             f"(only {', '.join(RESUME_CHANGEABLE)} may change when resuming)")
        loaded = model.load_state_dict(ck["model"], strict=not _partly_frozen(model))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if loaded.unexpected_keys or trainable & set(loaded.missing_keys):
            raise ValueError("cannot resume: the checkpoint's trainable weights do not match the "
                             "model's (another LoRA rank or target modules?)")
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if diff:
            changes = ", ".join(f"{k} {ck['config'][k]} -> {getattr(cfg, k)}" for k in sorted(diff))
            warnings.warn(f"resuming with {changes}: the run is no longer equal to an "
                          "uninterrupted one")
            # the checkpoint's optimizer and scheduler would restore the old lr
            factor = sched.lr_lambdas[0](sched.last_epoch)
            sched.base_lrs = [cfg.lr] * len(opt.param_groups)
            for group in opt.param_groups:
                group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor
        _set_rng_state(ck["rng"])
        pos, history, evals = ck["position"], ck["history"], ck["evals"]

    log = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        log = open(out / "history.jsonl", "w")
        for rec in history:
            log.write(json.dumps(rec) + "\n")
        log.flush()

    def evaluate(epoch):
        if eval_fn is not None:
            was_training = model.training
            model.eval()
            evals.append({"step": pos["step"], "epoch": epoch, **eval_fn(lm)})
            model.train(was_training)

    def save_checkpoint():
        if ckpt_path is not None:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": _model_state(model), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "rng": _rng_state(), "position": dict(pos),
                        "history": history, "evals": evals, "config": asdict(cfg)}, tmp)
            os.replace(tmp, ckpt_path)  # atomic: a crash mid-save never leaves a broken checkpoint

    if not resume:
        evaluate(0)
    model.train()
    bar = tqdm(total=total_steps, initial=pos["step"], disable=not cfg.progress, desc=cfg.method,
               dynamic_ncols=True)
    try:
        for epoch in range(pos["epoch"], cfg.epochs):
            batches = _epoch_batches(len(examples), cfg, epoch)
            for b in range(pos["batch"], len(batches)):
                order = batches[b]
                if cfg.length_bucketing:
                    order = sorted(order, key=lambda i: len(examples[i]["input_ids"]))
                minibatches = [lm.collate([examples[i] for i in idx])
                               for idx in chunks(order, cfg.minibatch_size)]
                # log pi_old per minibatch; filled at the batch's first PSFT step
                # ("take the snapshot")
                old = [None] * len(minibatches)
                for j in range(len(minibatches)):
                    rec = _step(lm, cfg, opt, sched, starting, minibatches, old, j, pos["step"],
                                token_hook)
                    pos["step"] += 1
                    rec.update(step=pos["step"], epoch=epoch + 1,
                               epoch_frac=pos["step"] / steps_per_epoch)
                    history.append(rec)
                    if log is not None:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", ent=f"{rec['entropy']:.3f}",
                                    clip=f"{rec['clipfrac']:.3f}", refresh=False)
                    if on_step is not None:
                        on_step(rec)
                    if cfg.eval_every and pos["step"] % cfg.eval_every == 0:
                        evaluate(pos["step"] / steps_per_epoch)
                pos["batch"] = b + 1
                end_of_epoch = b + 1 == len(batches)
                if end_of_epoch:
                    pos["epoch"], pos["batch"] = epoch + 1, 0
                    evaluate(epoch + 1)
                if end_of_epoch or (cfg.checkpoint_every and (b + 1) % cfg.checkpoint_every == 0):
                    save_checkpoint()
    except NonFiniteLossError as e:
        kept = (f"; the last good checkpoint is {ckpt_path}"
                if ckpt_path is not None and ckpt_path.exists() else "")
        raise NonFiniteLossError(f"{e}. Training stopped{kept}.") from None
    finally:
        bar.close()
        if log is not None:
            log.close()
        if out is not None:
            with open(out / "evals.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in evals)
    if out is not None:
        lm.save_pretrained(out / "final")
    return {"history": history, "evals": evals}


def summarize(history: list, cfg: TrainConfig) -> dict:
    """Run-level figures of a training history: final loss and NLL, mean tokens/s and, over the
    PSFT steps, the mean clip fraction, the steps with any clipping and the largest ratio.
    ``note`` says in words what a reader should know (e.g. that PSFT never clipped)."""
    psft = [r for r in history if LOSSES[r["method"]].snapshot]  # the clipped ones
    clipped = [r for r in psft if r["clipfrac"] > 0]
    last = history[-1]
    out = {"steps": len(history), "final_loss": last["loss"], "final_nll": last["nll"],
           "final_entropy": last["entropy"],
           "tokens_per_s": sum(r["tokens_per_s"] for r in history) / len(history),
           "psft_steps": len(psft), "steps_with_clipping": len(clipped),
           "mean_clipfrac": sum(r["clipfrac"] for r in psft) / len(psft) if psft else None,
           "max_ratio": max(r["ratio_max"] for r in psft) if psft else None, "note": ""}
    if psft and not clipped:
        out["note"] = (f"PSFT never clipped: the ratio never exceeded 1 + eps_high = "
                       f"{1 + cfg.eps_high:.2f} (largest {out['max_ratio']:.4f}), so at this lr "
                       "and data size PSFT behaved nearly as SFT (each token's gradient "
                       "weighted by a ratio near 1); raise the lr or the steps per snapshot "
                       "(batch_size / minibatch_size)")
    elif psft:
        out["note"] = (f"PSFT clipped on {len(clipped)} of {len(psft)} steps (mean clip fraction "
                       f"{out['mean_clipfrac']:.4f}). Its loss is -mean(clipped ratio), near -1 by "
                       "construction: watch final_nll for learning")
    return out


@torch.no_grad()
def _snapshot_logprobs(lm, minibatches, old, j, cfg):
    """Freeze the current weights as pi_old for minibatch ``j`` and the batch's later ones.

    Minibatch ``j``'s own log pi_old equals the log-probs of its training forward (same weights), so
    it is taken from there ("self"); each later minibatch costs one no-grad forward. (Scoring the
    whole batch in one forward was slower on CPU, measured with benchmarks/step_time.py.)
    """
    old[j] = "self"
    was_training = lm.model.training
    lm.model.eval()  # dropout off (LoRA dropout, say): pi_old is the weights, not a dropout sample
    for k in range(j + 1, len(minibatches)):
        micros = _micro_batches(minibatches[k], cfg)
        old[k] = torch.cat([lm.token_logprobs(micro)[0] for _, micro in micros])
    lm.model.train(was_training)


def _step(lm, cfg, opt, sched, starting, minibatches, old, j, step, token_hook=None) -> dict:
    """One optimizer step on minibatch ``j`` of the current batch."""
    t0 = time.perf_counter()
    model, mb = lm.model, minibatches[j]
    method = cfg.method
    if LOSSES[method].snapshot and step < cfg.sft_warmup_steps:  # plain SFT first
        method = "sft"
    if LOSSES[method].snapshot and cfg.refresh_pi_old and old[j] is None:
        _snapshot_logprobs(lm, minibatches, old, j, cfg)
    weights = token_weights(mb["completion_mask"], cfg.loss_aggregation)  # the loss's per token
    total_weight = weights.sum()
    parts = []
    for s, micro in _micro_batches(mb, cfg):
        mask = weights[s:s + len(micro["input_ids"])]
        logp_base = None  # the frozen starting model: pi_ref of sft_kl, or the anchored pi_old
        if starting is not None and method != "sft":
            logp_base = starting(micro)
        snapshot_is_now = isinstance(old[j], str)  # pi_old = these weights: log pi_old = log pi
        logp_old = logp_base  # anchored pi_old (or none), unless a snapshot was taken
        if old[j] is not None and not snapshot_is_now:
            logp_old = old[j][s:s + len(mask)]
        if lm.fused_head:
            terms = _token_terms(method, cfg, None if snapshot_is_now else logp_old, logp_base)
            loss, logp, entropy = lm.fused_loss(micro, terms, with_entropy=True, loss_mask=mask)
            with torch.no_grad():  # the same loss on the same log-probs, for its diagnostics
                metrics = _loss(method, cfg, logp, mask, logp if snapshot_is_now else logp_old,
                                logp_base)[1]
        else:
            logp, entropy = lm.token_logprobs(micro, with_entropy=True)
            loss, metrics = _loss(method, cfg, logp, mask,
                                  logp.detach() if snapshot_is_now else logp_old, logp_base)
        if token_hook is not None and LOSSES[method].snapshot:
            token_hook(micro, logp.detach(), logp.detach() if snapshot_is_now else logp_old)
        m = micro["completion_mask"].to(logp.dtype)  # NLL and entropy: plain token-means
        stats = torch.stack([loss.detach(), masked_mean(-logp.detach(), m), masked_mean(entropy, m),
                             micro["attention_mask"].sum().to(logp.dtype)])
        loss_value, nll, mean_entropy, tokens = stats.tolist()  # one host sync for all four
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f"non-finite loss ({loss_value}) at step {step + 1}")
        (loss * (mask.sum() / total_weight)).backward()
        parts.append({**metrics, "loss": loss_value, "nll": nll, "entropy": mean_entropy,
                      "tokens": int(tokens)})
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.item()
    if not math.isfinite(grad_norm):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"non-finite gradient norm at step {step + 1}")
    lr = opt.param_groups[0]["lr"]  # what this step uses (also right after a resume at a new lr)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    rec = merge_metrics(parts)
    rec.setdefault("clipfrac", 0.0)  # no clip in this loss: nothing was clipped
    for k in ("clipfrac_high", "clipfrac_low", "ratio_mean", "ratio_max", "approx_kl", "kl"):
        rec.setdefault(k, None)
    rec.update(method=method, grad_norm=grad_norm, lr=lr,
               pad_frac=1.0 - rec["tokens"] / mb["input_ids"].numel(),
               tokens_per_s=rec["tokens"] / (time.perf_counter() - t0))
    return rec
