"""Run plumbing, reached through ``train.Run``'s hooks: a run's folder, resuming from it exactly,
a progress bar and the run's summary. A checkpoint is data, not code: tensors and plain values (the
position, history and settings as JSON text) loaded with ``weights_only=True``, so a file copied
from elsewhere cannot run code on ``--resume``."""
import json
import os
import random
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .losses import LOSSES
from .train import NonFiniteLossError, Run, TrainConfig, TrainState

__all__ = ["Progress", "RunFolder", "load_checkpoint", "summarize", "RUN_FILES",
           "RESUME_CHANGEABLE"]

# what a run writes into its output folder (what --overwrite removes)
RUN_FILES = ("history.jsonl", "evals.jsonl", "config.json", "checkpoint.pt", "checkpoint.tmp",
             "summary.json", "final", "merged")
# settings that may differ when resuming: these do not change the result
RESUME_FREE = {"progress", "eval_every", "checkpoint_every"}
# settings that may differ with a warning (e.g. a lower lr after a NaN stop): same data, same
# schedule of snapshots, but no longer the uninterrupted run
RESUME_CHANGEABLE = ("lr", "grad_clip")


class Progress(Run):
    """A tqdm bar over the optimizer steps, with the last step's loss, entropy and clip fraction."""
    bar = None

    def start(self, lm, cfg: TrainConfig, state: TrainState) -> bool:
        self.bar = tqdm(total=state.steps_per_epoch * cfg.epochs, initial=state.step,
                        disable=not cfg.progress, desc=cfg.method, dynamic_ncols=True)
        return False

    def on_step(self, state: TrainState, record: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", ent=f"{record['entropy']:.3f}",
                             clip=f"{record['clipfrac']:.3f}", refresh=False)

    def on_stop(self, lm, state: TrainState, error) -> None:
        if self.bar is not None:
            self.bar.close()


class RunFolder(Progress):
    """A run kept in ``out``: ``config.json``, ``history.jsonl`` (a line per step, as it goes),
    ``evals.jsonl``, ``checkpoint.pt`` (every epoch and every ``checkpoint_every`` batches) and
    ``final/``. ``resume=True`` gives the uninterrupted run's result (see ``restore``)."""

    def __init__(self, out, resume: bool = False, overwrite: bool = False):
        # checked here, before a model is loaded: a download can take minutes
        self.out, self.resume, self.overwrite = Path(out), resume, overwrite
        self.checkpoint = self.out / "checkpoint.pt"
        self.cfg, self.log = None, None
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run or "
                             "replace it")
        if any((self.out / f).exists() for f in RUN_FILES) and not (resume or overwrite):
            raise FileExistsError(f"{self.out} already holds a run: add --resume to continue it or "
                                  "--overwrite to replace it (resume=True / overwrite=True)")
        if resume and not self.checkpoint.is_file():
            raise FileNotFoundError(f"resume: there is no checkpoint at {self.checkpoint}")

    def start(self, lm, cfg: TrainConfig, state: TrainState) -> bool:
        self.cfg = cfg
        if self.overwrite:  # nothing of an old run survives into the new one
            for target in (self.out / name for name in RUN_FILES):
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        if self.resume:
            restore(load_checkpoint(self.checkpoint, lm.device), lm, cfg, state)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        self.log = open(self.out / "history.jsonl", "w")
        self.log.writelines(json.dumps(r) + "\n" for r in state.history)
        self.log.flush()
        super().start(lm, cfg, state)
        return self.resume

    def on_step(self, state: TrainState, record: dict) -> None:
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        super().on_step(state, record)

    def on_batch_end(self, lm, state: TrainState) -> None:
        every = self.cfg.checkpoint_every
        if state.batch == 0 or (every and state.batch % every == 0):  # epoch end, or every N
            save_checkpoint(self.checkpoint, lm, self.cfg, state)

    def on_stop(self, lm, state: TrainState, error) -> None:
        super().on_stop(lm, state, error)
        if self.log is not None:
            self.log.close()
        (self.out / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state.evals))
        if error is None:
            lm.save_pretrained(self.out / "final")
        elif isinstance(error, NonFiniteLossError):
            kept = (f"; the last good checkpoint is {self.checkpoint}"
                    if self.checkpoint.exists() else "")
            raise NonFiniteLossError(f"{error}. Training stopped{kept}.") from None


def partly_frozen(model) -> bool:
    """Whether part of the model does not train (LoRA: the base under the adapter)."""
    return not all(p.requires_grad for p in model.parameters())


def save_checkpoint(path: Path, lm, cfg: TrainConfig, state: TrainState) -> None:
    """Written to a temporary file, then renamed: a crash mid-save never leaves a broken one."""
    plain = {"epoch": state.epoch, "batch": state.batch, "step": state.step,
             "history": state.history, "evals": state.evals, "config": asdict(cfg),
             "python_rng": random.getstate()}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    model = lm.model  # partly frozen (LoRA): the adapter only, not a second copy of the base
    weights = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
               if partly_frozen(model) else model.state_dict())
    tmp = path.with_suffix(".tmp")
    torch.save({"model": weights, "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": cuda, "state": json.dumps(plain)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device) -> dict:
    """A checkpoint's contents, its plain part parsed; refused unless tensors and plain values."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and whatever a crafted file raises
        raise ValueError(f"{path} is not a minipsft checkpoint holding only tensors and plain "
                         f"values; refused to load it ({type(e).__name__})") from None
    if not isinstance(ck, dict) or "state" not in ck:
        raise ValueError(f"{path} is a checkpoint of an older minipsft (or not one): it cannot be "
                         "resumed; start the run again (--overwrite)")
    ck["state"] = json.loads(ck["state"])
    return ck


def restore(ck: dict, lm, cfg: TrainConfig, state: TrainState) -> None:
    """Put a checkpoint's weights, optimizer, schedule, RNG and position into ``state``; another
    ``lr`` or ``grad_clip`` (RESUME_CHANGEABLE) is allowed with a warning."""
    saved = ck["state"]
    diff = {k for k in saved["config"] if saved["config"][k] != getattr(cfg, k)} - RESUME_FREE
    refused = sorted(diff - set(RESUME_CHANGEABLE))
    if refused:
        raise ValueError(f"cannot resume: settings differ from the checkpoint's: {refused} "
                         f"(only {', '.join(RESUME_CHANGEABLE)} may change when resuming)")
    model = lm.model
    loaded = model.load_state_dict(ck["model"], strict=not partly_frozen(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if loaded.unexpected_keys or trainable & set(loaded.missing_keys):
        raise ValueError("cannot resume: the checkpoint's trainable weights do not match the "
                         "model's (another LoRA rank or target modules?)")
    state.optimizer.load_state_dict(ck["optimizer"])
    state.scheduler.load_state_dict(ck["scheduler"])
    if diff:
        changes = ", ".join(f"{k} {saved['config'][k]} -> {getattr(cfg, k)}" for k in sorted(diff))
        warnings.warn(f"resuming with {changes}: the run is no longer equal to an "
                      "uninterrupted one")
        sched = state.scheduler  # the checkpoint's optimizer and scheduler restore the old lr
        factor = sched.lr_lambdas[0](sched.last_epoch)
        sched.base_lrs = [cfg.lr] * len(state.optimizer.param_groups)
        for group in state.optimizer.param_groups:
            group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor
    torch.set_rng_state(ck["torch_rng"].cpu())
    version, internal, gauss = saved["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    if ck["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ck["cuda_rng"]])
    state.epoch, state.batch, state.step = saved["epoch"], saved["batch"], saved["step"]
    state.history, state.evals = saved["history"], saved["evals"]


def summarize(history: list, cfg: TrainConfig) -> dict:
    """Run-level figures of a history and a ``note`` in words (e.g. that PSFT never clipped)."""
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
                       "and data size PSFT behaved nearly as SFT (every ratio near 1); raise the "
                       "lr or the steps per snapshot (batch_size / minibatch_size)")
    elif psft:
        out["note"] = (f"PSFT clipped on {len(clipped)} of {len(psft)} steps (mean clip fraction "
                       f"{out['mean_clipfrac']:.4f}). Its loss is -mean(clipped ratio), near -1 by "
                       "construction: watch final_nll for learning")
    return out
