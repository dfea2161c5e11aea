"""The runner: a world + the training loop -> a results folder. ``python -m minipsft reproduce
--preset cpu --out DIR`` pretrains (or loads) the base, fine-tunes it with every arm and ablation
on the same data and order per seed, evaluating every epoch in a pool of processes, and writes the
results folder (``results.py``). ``--preset gsm8k --model ID`` runs on a given model instead."""
import statistics
import time
from collections import Counter
from dataclasses import asdict, fields, replace
from functools import partial
from pathlib import Path

import torch

from . import toy
from ..model import CausalLM
from ..train import train
from .ablations import ABLATIONS, ablation_jobs
from .presets import MAIN_MINUTES, Preset, arm_config, as_text, cache_folder, preset_of, same_preset
from .records import Job, Run, Site
from .results import load_results, write_results
from .store import RunStore, run_saved
from .worlds import make_world


def run_one(job: Job) -> Run:
    """Fine-tune the base with one arm and seed; its eval records and step history."""
    site, p = job.site, job.site.preset
    torch.set_num_threads(site.threads)
    world = make_world(p)
    lm = CausalLM.from_pretrained(site.base_path, device=site.device, dtype=world.dtype,
                                  compile=p.compile,
                                  gradient_checkpointing=p.gradient_checkpointing)
    examples = lm.encode(world.train_rows(job.seed), max_length=p.max_length)
    evaluator = world.evaluator(lm)
    cfg = replace(job.config, seed=job.seed)
    clipped = ClippedTokens(lm.tokenizer, cfg.eps_high) if job.clip_analysis else None
    best = {"epoch": None, "id_acc": -1.0}
    if job.save_best:  # keep the best-ID fine-tuned epoch (the paper's choice of RL start)
        evaluator = keep_best(evaluator, Path(job.save_best) / f"{job.arm}-s{job.seed}", best)
    hook = getattr(ABLATIONS.get(job.group), "on_step", None)  # an ablation's, if it has one
    on_step = hook(lm, world, cfg, len(examples)) if hook else None
    t0 = time.perf_counter()
    result = train(lm, examples, cfg, eval_fn=evaluator, token_hook=clipped, on_step=on_step)
    return Run(job, eval_records(job, cfg, result), result["history"], time.perf_counter() - t0,
               clipped.summary() if clipped else None, best if job.save_best else None)


def eval_records(job: Job, cfg, result: dict) -> list:
    """One run's rows of results.json: each evaluation, with its epoch's entropy and clipfrac."""
    records = []
    for ev in result["evals"]:
        steps = [r for r in result["history"] if r["epoch"] == ev["epoch"]]
        entropy = statistics.fmean(r["entropy"] for r in steps) if steps else None
        clipfrac = statistics.fmean(r["clipfrac"] for r in steps) if steps else None
        records.append({"method": job.arm, "loss": cfg.method, "seed": job.seed, **ev,
                        "train_entropy": entropy, "clipfrac": clipfrac, "group": job.group,
                        "setting": job.setting})
    return records


def keep_best(evaluator, path: Path, best: dict):
    """Wrap an evaluator so that after each epoch (not at the start) the model is saved to ``path``
    when its ID accuracy beats every earlier epoch's (ties keep the earlier epoch)."""
    calls = [0]

    def evaluate(lm):
        out = evaluator(lm)
        if calls[0] > 0 and out["id_acc"] > best["id_acc"]:
            best.update(epoch=calls[0], id_acc=out["id_acc"], path=str(path))
            lm.save_pretrained(path)
        calls[0] += 1
        return out
    return evaluate


class ClippedTokens:
    """Counts the completion tokens PSFT's clip stops (ratio > 1 + eps_high) by role
    (``toy.completion_roles``; EOS is ``format``): the toy analogue of the paper's finding that
    clipped tokens are mostly "thinking-pattern" words."""

    def __init__(self, tokenizer, eps_high: float):
        self.tokenizer, self.eps_high = tokenizer, eps_high
        self.seen, self.clipped, self.by_token = Counter(), Counter(), Counter()

    def __call__(self, micro, logp, logp_old):
        hit = torch.exp(logp - logp_old) > 1 + self.eps_high
        for ids, mask, row in zip(micro["input_ids"], micro["completion_mask"].bool(), hit):
            pieces = self.tokenizer.convert_ids_to_tokens(ids[mask].tolist())
            eos = pieces[-1] == self.tokenizer.eos_token
            roles = (toy.completion_roles("".join(pieces[:-1] if eos else pieces))
                     + (["format"] if eos else []))
            for piece, role, h in zip(pieces, roles, row[mask].tolist()):
                self.seen[role] += 1
                self.clipped[role] += h
                if h:
                    self.by_token[f"{piece} ({role})"] += 1

    def summary(self) -> dict:
        total = max(1, sum(self.clipped.values()))
        return {"seen": dict(self.seen), "clipped": dict(self.clipped),
                "clip_rate": {r: self.clipped[r] / max(1, self.seen[r]) for r in self.seen},
                "share_of_clipped": {r: self.clipped[r] / total for r in self.seen},
                "share_of_tokens": {r: self.seen[r] / max(1, sum(self.seen.values()))
                                    for r in self.seen},
                "top_tokens": self.by_token.most_common(12)}


def run_jobs(jobs: list, workers: int, desc: str, fn=run_one, store: RunStore | None = None,
             deadline: float | None = None) -> list:
    """``fn`` (a job -> a ``Run``) on every job not saved in ``store`` yet (``store.run_saved``)."""
    plain = run_saved(jobs, partial(plain_run, fn), lambda job: job.name, store, workers, desc,
                      deadline)
    return [Run(job, **run) for job, run in zip(jobs, plain)]


def plain_run(fn, job) -> dict:
    """``fn(job)``, a ``Run``, as the plain values a store keeps (everything but the job)."""
    return {k: v for k, v in vars(fn(job)).items() if k != "job"}


def run_store(out: Path, name: str, p: Preset, device: str, overwrite: bool,
              rl_config: dict | None = None) -> RunStore:
    """The store of a results folder's runs, with the settings that change a result."""
    config = {k: v for k, v in asdict(p).items() if k not in ("workers", "threads")}
    settings = {"preset": name, "preset_config": as_text(config), "device": device}
    return RunStore(out, settings | ({"rl_config": rl_config} if rl_config else {}), overwrite)


def reproduce(preset_name: str, out_dir, cache_dir=None, seeds=None, workers=None, ablations=(),
              main=True, device: str = "auto", model=None, data_dir=None, save_best: bool = False,
              max_minutes: float | None = None, overwrite: bool = False, **overrides) -> dict:
    """Run the comparison (and ablations) and write every results file and figure into ``out_dir``.
    ``model``, ``data_dir``, ``overrides``: ``Preset`` fields. ``save_best``: keep each main run's
    best-ID epoch in ``out_dir/checkpoints/ARM-sSEED/`` (the RL stage starts there). Each run is
    saved as it ends (``out_dir/runs/``): the same call again runs only the missing ones (other
    settings are refused unless ``overwrite``); after ``max_minutes`` no run starts."""
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    given = dict(model=model, data_dir=data_dir, seeds=None if seeds is None else tuple(seeds),
                 workers=workers)
    overrides |= {k: v for k, v in given.items() if v is not None}
    p = replace(preset_of(preset_name), **as_text(overrides))
    world = make_world(p)  # checks the settings and reads the user's files before anything runs
    jobs = {name: ablation_jobs(p, name) for name in ablations}  # and the ablations' names
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, p.threads * p.workers))
    base_path, how, pretrained = world.base_model(cache_folder(cache_dir), device)
    print(f"base model: {base_path} ({how})")
    t_base = time.perf_counter() - t0
    site = Site(p, str(base_path), device, p.threads)
    name = preset_name if isinstance(preset_name, str) else p.world
    store = run_store(out, name, p, device, overwrite)
    save_best = str(out / "checkpoints") if save_best else None
    runs = main_runs(p, site, save_best, store, deadline) if main else []
    for group in ablations:
        runs += run_jobs([replace(j, site=site) for j in jobs[group]], p.workers,
                         f"ablation {group}", store=store, deadline=deadline)
    return write_results(out, p, name, runs, base_path, not pretrained,
                         time.perf_counter() - t0, t_base)


def main_runs(p: Preset, site: Site, save_best: str | None, store=None, deadline=None) -> list:
    """The main comparison: every arm at every seed, then ``sft_small``, whose lr is ``p.lr``
    times PSFT's over SFT's weight drift after epoch 1 at the same seed."""
    jobs = [Job(arm, s, "main", arm, arm_config(p, arm), site, save_best=save_best,
                clip_analysis=(arm == "psft" and s == p.seeds[0] and p.world == "toy"))
            for s in p.seeds for arm in p.arms if arm != "sft_small"]
    runs = run_jobs(jobs, p.workers, "main runs", store=store, deadline=deadline)

    def drift(arm, seed):  # after epoch 1
        run = next(r for r in runs if r.job.arm == arm and r.job.seed == seed)
        return next(x["drift"] for x in run.records if x["epoch"] == 1)
    small = []
    for s in (p.seeds if "sft_small" in p.arms else ()):
        ratio = drift("psft", s) / drift("sft", s)
        small.append(Job("sft_small", s, "main", "sft_small", site=site, save_best=save_best,
                         config=arm_config(p, "sft_small", lr=p.lr * ratio), step_ratio=ratio))
    return runs + run_jobs(small, p.workers, "sft at psft's step size", store=store,
                           deadline=deadline)


def reproduce_or_load(preset_name: str, out_dir, ablations=(), main=True, **kw) -> dict:
    """Load ``out_dir``'s results when they were made with this preset's exact settings (and hold
    the asked-for ablations), else run ``reproduce``. Says which it did."""
    path = Path(out_dir) / "results.json"
    kw = as_text(kw)
    if path.exists():
        res = load_results(out_dir)
        current = replace(preset_of(preset_name),
                          **{k: v for k, v in kw.items() if k in {f.name for f in fields(Preset)}})
        same = same_preset(res["summary"]["preset_config"], current)
        groups = {r["group"] for r in res["records"]}
        if same and set(ablations) <= groups and (not main or "main" in groups):
            print(f"loaded results from {path} (made with the same '{preset_name}' settings; "
                  f"delete the folder to run again)")
            return res
    minutes = MAIN_MINUTES.get(preset_name) if isinstance(preset_name, str) else None
    print(f"no results made with the '{preset_name}' settings in {out_dir}: running them now"
          + (f" (the main comparison took ~{minutes} when measured)" if minutes else ""))
    reproduce(preset_name, out_dir, ablations=ablations, main=main, **kw)
    return load_results(out_dir)
