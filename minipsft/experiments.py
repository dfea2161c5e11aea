"""The experiment runner: a world (the toy world, or GSM8K for a real model) + the training loop ->
results files and figures.

``python -m minipsft reproduce --preset cpu --out DIR`` pretrains (or loads) the base model, then
fine-tunes it with every *arm* below from the same base, on the same data and data order per seed,
evaluating after every epoch, and writes ``DIR/results.json``, per-step histories, ``DIR/report.md``
and the figures. Two regimes, because the paper's comparison changed two things at once:

  paper recipe  ``psft``      several minibatch steps per pi_old snapshot, lower lr
                ``sft_paper`` one update per batch at a higher lr (the paper's SFT baseline)
  controlled    ``sft``       PSFT's schedule and lr, only the loss differs
                ``sft_kl``, ``dft``  the baselines, same schedule and lr
                ``sft_small`` SFT at PSFT's *effective* step size: its lr is ``lr`` times the
                              ratio of PSFT's to SFT's weight drift after epoch 1 (same seed), since
                              Adam makes step size a matter of how far the weights move, not of loss
                              scale.

Ablations (``--ablations refresh eps warmup``): refresh period, eps_high and no clip, SFT warm-up.
``--preset gsm8k --model ID`` runs ``psft``, ``sft`` and ``sft_paper`` on a given model instead
(``real.py``: GSM8K in domain, TruthfulQA MC1 and ARC-Challenge out of domain).
"""
import json
import math
import os
import statistics
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import MISSING, asdict, dataclass, fields, replace
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import plots, toy
from .losses import LOSSES
from .model import CausalLM
from .train import TrainConfig, heldout_eval, train
from .worlds import ToyWorld, make_world, world_words

# one arm per registered loss (losses.LOSSES, at PSFT's schedule and lr), plus two SFT controls
ARMS = tuple(LOSSES) + ("sft_paper", "sft_small")
ABLATIONS = ("refresh", "eps", "warmup", "aggregation", "frontier", "sawtooth")
# the "sawtooth" runs: held-out entropy at every step within this many steps of an epoch boundary
SAWTOOTH_ARMS, SAWTOOTH_STEPS, SAWTOOTH_ROWS = ("psft", "sft", "sft_paper"), 4, 128
# the "frontier" sweep: the controlled arms at 5 lrs (the cpu preset's 1e-4 in the middle of a
# 100x range, up to where plain SFT steps get large), paper-recipe SFT at 3 (its 2e-3 in the middle)
FRONTIER_ARMS = ("psft", "sft", "sft_kl")
FRONTIER_LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
FRONTIER_PAPER_LRS = (6e-4, 2e-3, 6e-3)
# the "aggregation" ablation: the headline arms under the official run's loss aggregation and
# lr warm-up, beside the default on the same base and seeds
AGGREGATION_VARIANTS = {"token-mean": {}, "seq-mean": dict(loss_aggregation="seq_mean_token_mean"),
                        "warm-up 10 batches": dict(lr_warmup_batches=10)}
AGGREGATION_ARMS = ("psft", "sft", "sft_paper")


@dataclass
class Preset:
    """Sizes of one reproduction. ``lr`` is PSFT's (and the controlled arms'); ``sft_paper_lr`` the
    paper-recipe SFT's (20x, as the official 2e-5 vs 1e-6). Batch/minibatch mirror the official
    256/32 (8 steps per snapshot). The cpu preset's lr was chosen on SFT alone (seed 0), before any
    PSFT run of this world: at 3e-4 SFT reached its ID plateau at epoch 2, at 1e-4 around epoch 4
    (as the paper's SFT did), so 1e-4."""
    base: toy.BaseConfig | None
    n_train: int = 1024
    n_id_eval: int = 256
    ood_per_task: int = 32
    n_samples: int = 128
    epochs: int = 6
    batch_size: int = 128
    minibatch_size: int = 16
    lr: float = 1e-4
    sft_paper_lr: float = 2e-3
    kl_coef: float = 0.5
    seeds: tuple = (0, 1, 2)
    workers: int = 2
    threads: int = 1
    world: str = "toy"
    arms: tuple = ARMS
    max_new_tokens: int = 320
    max_length: int | None = None
    # demonstrations per forward/backward (0: whole minibatch); same result, less memory
    micro_batch_size: int = 0
    # minibatches of similar lengths (less padding); same batches for every arm
    length_bucketing: bool = False
    # torch.compile the decoder layers and vocabulary chunks (CausalLM(compile=True))
    compile: bool = False
    gradient_checkpointing: bool = False  # recompute each layer in backward (less GPU memory)
    loss_aggregation: str = "token_mean"  # or seq_mean_token_mean (train.TrainConfig)
    lr_warmup_batches: int = 0  # the official lr warm-up, counted in batches (train.TrainConfig)
    pretrain_seed: int | None = None  # pretrain the base with this seed instead of base's own
    # the gsm8k and files worlds (worlds.py): the model, and where the data come from
    model: str | None = None  # hub id or folder of the model to fine-tune
    data_dir: str | None = None  # gsm8k: local files in the hub schemas (real.LOCAL_FILES)
    train_file: str | None = None  # files: training rows, TRL's prompt-completion or messages
    test_file: str | None = None  # files: held-out rows, the answer scored by exact match
    ood_files: tuple = ()  # files: NAME=PATH sets, multiple-choice JSONL or prompt/answer rows
    answer: str = "whole"  # files: what exact match compares: whole, gsm8k or a regex (group 1)


PRESETS = {
    # a first look (75 s on 2 cores with the shipped base): the cpu preset's base, data and lrs,
    # one seed, the headline arms, 4 epochs, smaller evaluations
    "quick": Preset(base=toy.BaseConfig(), n_id_eval=128, ood_per_task=16, n_samples=32, epochs=4,
                    seeds=(0,), arms=("psft", "sft", "sft_paper")),
    "smoke": Preset(base=toy.BaseConfig(hidden=64, layers=2, pretrain_rows=6_000, pretrain_lr=5e-3),
                    n_train=64, n_id_eval=32, ood_per_task=4, n_samples=16, epochs=4, batch_size=32,
                    minibatch_size=8, lr=1e-3, sft_paper_lr=4e-3, seeds=(0,), workers=1, threads=2),
    "cpu": Preset(base=toy.BaseConfig()),
    "gpu": Preset(base=toy.BaseConfig(hidden=256, layers=6, heads=8, pretrain_rows=640_000,
                                      pretrain_batch=128, pretrain_lr=1e-3),
                  n_train=4096, n_id_eval=1024, ood_per_task=128, n_samples=512, epochs=8,
                  batch_size=256, minibatch_size=32, lr=5e-5, sft_paper_lr=1e-3,
                  seeds=(0, 1, 2, 3, 4),
                  # 8 runs at once on the one GPU: each 1.86x slower, 4.3x the throughput (H200,
                  # benchmarks/gpu_preset_probe.py, results/gpu/README.md)
                  workers=8, threads=2),
    # the user's own files and model (the compare command): every row, the paper's lrs
    "files": Preset(base=None, world="files", arms=("psft", "sft", "sft_paper"), n_train=0,
                    n_id_eval=0, ood_per_task=0, epochs=3, batch_size=64, minibatch_size=8,
                    lr=1e-6, sft_paper_lr=2e-5, seeds=(0,), workers=1, threads=8,
                    max_length=1024, micro_batch_size=8, length_bucketing=True),
    # a hub model (--model) on GSM8K, OOD = TruthfulQA MC1 and ARC-Challenge; one GPU
    "gsm8k": Preset(base=None, world="gsm8k", arms=("psft", "sft", "sft_paper"), n_train=2048,
                    n_id_eval=250, ood_per_task=250, epochs=4, batch_size=256, minibatch_size=32,
                    lr=1e-6, sft_paper_lr=2e-5, seeds=(0,), workers=1, threads=8, max_length=1024,
                    micro_batch_size=8, length_bucketing=True),
}


PATH_FIELDS = ("model", "data_dir", "train_file", "test_file")


def as_text(settings: dict) -> dict:
    """Paths in Preset settings as text, as results.json holds them (``ood_files`` as a tuple)."""
    out = dict(settings)
    for key in PATH_FIELDS:
        if out.get(key) is not None:
            out[key] = str(out[key])
    if "ood_files" in out:
        out["ood_files"] = tuple(str(spec) for spec in out["ood_files"])
    return out


def preset_of(preset) -> Preset:
    """A preset by name (``PRESETS``), or a ``Preset`` itself."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def preset_from_env() -> str:
    """The preset a notebook should run: MINIPSFT_PRESET if set, else ``smoke`` under CI=true, else
    ``gpu`` when a GPU is present and ``cpu`` otherwise."""
    if os.environ.get("MINIPSFT_PRESET"):
        return os.environ["MINIPSFT_PRESET"]
    if os.environ.get("CI", "").lower() == "true":
        return "smoke"
    return "gpu" if torch.cuda.is_available() else "cpu"


def arm_config(p: Preset, arm: str, **overrides) -> TrainConfig:
    common = dict(epochs=p.epochs, batch_size=p.batch_size, minibatch_size=p.minibatch_size,
                  lr=p.lr, kl_coef=p.kl_coef, micro_batch_size=p.micro_batch_size,
                  length_bucketing=p.length_bucketing, loss_aggregation=p.loss_aggregation,
                  lr_warmup_batches=p.lr_warmup_batches, progress=False)
    method = arm if arm in LOSSES else "sft"  # sft_paper and sft_small are SFT
    cfg = TrainConfig(method=method, **common)
    if arm == "sft_paper":
        cfg = replace(cfg, minibatch_size=p.batch_size, lr=p.sft_paper_lr)
    return replace(cfg, **overrides)


# ------------------------------------------------------------------------------------------ one run
def run_one(job: dict) -> dict:
    """Fine-tune the base with one arm and seed; return its eval records and step history."""
    torch.set_num_threads(job["threads"])
    p: Preset = job["preset"]
    world = make_world(p)
    lm = CausalLM.from_pretrained(job["base_path"], device=job.get("device", "cpu"),
                                  dtype=world.dtype, compile=p.compile,
                                  gradient_checkpointing=p.gradient_checkpointing)
    examples = lm.encode(world.train_rows(job["seed"]), max_length=p.max_length)
    evaluator = world.evaluator(lm)
    cfg = replace(TrainConfig(**job["config"]), seed=job["seed"])
    clipped = ClippedTokens(lm.tokenizer, cfg.eps_high) if job.get("clip_analysis") else None
    best = {"epoch": None, "id_acc": -1.0}
    # keep the best-ID fine-tuned epoch (the paper's choice of RL starting point)
    if job.get("save_best"):
        evaluator = _keep_best(evaluator,
                               Path(job["save_best"]) / f"{job['arm']}-s{job['seed']}", best)
    t0 = time.perf_counter()
    on_step = None
    if job.get("group") == "sawtooth":
        on_step = heldout_near_boundaries(lm, world, cfg, len(examples))
    result = train(lm, examples, cfg, eval_fn=evaluator, token_hook=clipped, on_step=on_step)
    by_epoch = defaultdict(list)
    for r in result["history"]:
        by_epoch[r["epoch"]].append(r)
    records = []
    for ev in result["evals"]:
        steps = by_epoch.get(ev["epoch"], [])
        entropy = statistics.fmean(r["entropy"] for r in steps) if steps else None
        clipfrac = statistics.fmean(r["clipfrac"] for r in steps) if steps else None
        records.append({"method": job["arm"], "loss": cfg.method, "seed": job["seed"], **ev,
                        "train_entropy": entropy, "clipfrac": clipfrac,
                        "group": job.get("group", "main"),
                        "setting": job.get("setting", job["arm"])})
    return {"job": {k: v for k, v in job.items() if k != "preset"}, "records": records,
            "history": result["history"], "seconds": time.perf_counter() - t0,
            "clipped_tokens": clipped.summary() if clipped else None,
            "best": best if job.get("save_best") else None}


def heldout_near_boundaries(lm, world, cfg: TrainConfig, n_examples: int):
    """``on_step`` for the saw-tooth test: within ``SAWTOOTH_STEPS`` steps of an epoch boundary,
    add the mean token entropy of a fixed held-out set of ID demonstrations (never trained on) to
    the step's record as ``heldout_entropy``."""
    if not isinstance(world, ToyWorld):
        raise ValueError("the sawtooth ablation runs in the toy world")
    held = lm.encode(toy.id_rows(SAWTOOTH_ROWS, seed=3))
    per_epoch = -(-n_examples // cfg.minibatch_size)

    def on_step(record):
        position = record["step"] - (record["epoch"] - 1) * per_epoch  # 1 .. per_epoch
        if position <= SAWTOOTH_STEPS or position > per_epoch - SAWTOOTH_STEPS:
            record["heldout_entropy"] = heldout_eval(lm, held)["heldout_entropy"]
    return on_step


def _keep_best(evaluator, path: Path, best: dict):
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
    """Counts which completion tokens PSFT's clip stops (ratio > 1 + eps_high), by role
    (``toy.completion_roles``): ``format`` (the teacher's style words and separators, EOS) or
    ``content`` (the letter count and the answer): the toy analogue of the paper's finding that
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


# ------------------------------------------------------------------------------------ orchestration
def run_jobs(jobs: list, workers: int, desc: str, fn=run_one) -> list:
    if workers <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(tqdm(pool.map(fn, jobs), total=len(jobs), desc=desc))


def _drift_at_epoch1(run: dict) -> float:
    return next(r["drift"] for r in run["records"] if r["epoch"] == 1)


def reproduce(preset_name: str, out_dir, cache_dir=None, seeds=None, workers=None, ablations=(),
              main=True, device: str = "auto", model=None, data_dir=None, save_best: bool = False,
              **overrides) -> dict:
    """Run the comparison (and ablations) and write every results file and figure into ``out_dir``.
    ``device="auto"``: the GPU when there is one, else the CPU. ``model``: the hub id or folder of
    the model to fine-tune (``gsm8k`` preset; the toy presets pretrain their own). ``data_dir``:
    local files instead of the hub (``real.LOCAL_FILES``). ``save_best``: keep each main run's
    best-ID epoch in ``out_dir/checkpoints/ARM-sSEED/`` (the RL stage starts there).
    ``overrides``: any ``Preset`` field."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model is not None:
        overrides["model"] = model
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    p = replace(preset_of(preset_name), **as_text(overrides))
    if seeds is not None:
        p = replace(p, seeds=tuple(seeds))
    if workers is not None:
        p = replace(p, workers=workers)
    world = make_world(p)  # checks the settings and reads the user's files before anything runs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir or os.environ.get("MINIPSFT_CACHE",
                                                 Path.home() / ".cache" / "minipsft"))
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, p.threads * p.workers))
    base_path, how, pretrained = world.base_model(cache_dir, device)
    cached = not pretrained
    print(f"base model: {base_path} ({how})")
    t_base = time.perf_counter() - t0
    job0 = dict(preset=p, base_path=str(base_path), threads=p.threads, device=device)
    main_job = dict(job0, save_best=str(out / "checkpoints") if save_best else None)
    runs = []
    if main:
        jobs = [dict(main_job, arm=arm, seed=s, config=asdict(arm_config(p, arm)),
                     clip_analysis=(arm == "psft" and s == p.seeds[0] and p.world == "toy"))
                for s in p.seeds for arm in p.arms if arm != "sft_small"]
        runs += run_jobs(jobs, p.workers, "main runs")
        small = []
        for s in (p.seeds if "sft_small" in p.arms else ()):
            psft, sft = (next(r for r in runs if r["job"]["arm"] == a and r["job"]["seed"] == s)
                         for a in ("psft", "sft"))
            ratio = _drift_at_epoch1(psft) / _drift_at_epoch1(sft)
            small.append(dict(main_job, arm="sft_small", seed=s, step_ratio=ratio,
                              config=asdict(arm_config(p, "sft_small", lr=p.lr * ratio))))
        runs += run_jobs(small, p.workers, "sft at psft's step size")
    for name in ablations:
        runs += run_jobs(ablation_jobs(p, name, job0), p.workers, f"ablation {name}")
    wall = time.perf_counter() - t0
    name = preset_name if isinstance(preset_name, str) else p.world
    return write_results(out, p, name, runs, base_path, cached, wall, t_base)


def same_preset(saved: dict, p: Preset) -> bool:
    """Whether a results folder's ``preset_config`` holds ``p``'s settings. Settings added to Preset
    after the folder was written count as their defaults there; ``workers`` and ``threads`` never
    change a result."""
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(Preset)
                                      if f.default is not MISSING}))
    current = json.loads(json.dumps(asdict(p)))
    return all(saved.get(k, defaults.get(k)) == v for k, v in current.items()
               if k not in ("workers", "threads"))


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


# what the main comparison took when measured (README, results/gpu/README.md): said before a run
MAIN_MINUTES = {"quick": "1.3 min on 2 CPU cores", "smoke": "1 min on 2 CPU cores",
                "cpu": "9 min on 2 CPU cores", "gpu": "11 min on one H200 (estimated from "
                "benchmarks/gpu_preset_probe.py; no gpu results are committed yet)"}


def ablation_jobs(p: Preset, name: str, job0: dict) -> list:
    """Settings of one ablation, each a PSFT run (refresh 1 is SFT's schedule: the clip never
    acts)."""
    mb = p.minibatch_size
    if name == "refresh":
        settings = {f"refresh {k}": dict(batch_size=mb * k) for k in (1, 4, 8, 16)}
        settings["refresh never"] = dict(refresh_pi_old=False)
    elif name == "eps":
        settings = {f"eps_high {e}": dict(eps_high=e) for e in (0.14, 0.28, 0.42)}
        settings["no clip"] = dict(eps_high=1e9)
    elif name == "warmup":
        steps = p.n_train // mb // 2
        settings = {"no warm-up": {}, f"sft warm-up {steps} steps": dict(sft_warmup_steps=steps)}
    elif name == "frontier":
        runs = [(arm, lr) for arm in FRONTIER_ARMS for lr in FRONTIER_LRS]
        runs += [("sft_paper", lr) for lr in FRONTIER_PAPER_LRS]
        return [dict(job0, arm=arm, group=name, setting=f"{arm} lr={lr:g}", seed=s,
                     config=asdict(arm_config(p, arm, lr=lr)))
                for arm, lr in runs for s in p.seeds]
    elif name == "sawtooth":
        return [dict(job0, arm=arm, group=name, setting=arm, seed=s,
                     config=asdict(arm_config(p, arm))) for arm in SAWTOOTH_ARMS for s in p.seeds]
    elif name == "aggregation":
        return [dict(job0, arm=arm, group=name, setting=f"{arm}, {label}", seed=s,
                     config=asdict(arm_config(p, arm, **kw)))
                for label, kw in AGGREGATION_VARIANTS.items() for arm in AGGREGATION_ARMS
                for s in p.seeds]
    else:
        raise ValueError(f"unknown ablation {name!r}: choose from {', '.join(ABLATIONS)}")
    return [dict(job0, arm="psft", group=name, setting=label, seed=s,
                 config=asdict(arm_config(p, "psft", **kw)))
            for label, kw in settings.items() for s in p.seeds]


# ------------------------------------------------------------------------------------ frontier
def frontier_points(records, seeds=None) -> dict:
    """arm -> [(mean ID, mean OOD, lr, epoch)] over ``seeds`` (default: all), one point per lr and
    epoch after the start: every place a run of that arm passed through."""
    cells = defaultdict(list)
    for r in records:
        if r["epoch"] > 0:
            cells[(r["method"], r["setting"], r["epoch"])].append(r)
    points = defaultdict(list)
    for (arm, setting, epoch), rs in sorted(cells.items()):
        by_seed = {r["seed"]: r for r in rs}
        chosen = [by_seed[s] for s in (seeds if seeds is not None else sorted(by_seed))]
        lr = float(setting.split("lr=")[1])
        points[arm].append((statistics.fmean(r["id_acc"] for r in chosen),
                            statistics.fmean(r["ood_acc"] for r in chosen), lr, epoch))
    return dict(points)


def frontier_value(points, level: float):
    """The best OOD accuracy among the points with ID accuracy >= ``level`` (None if none)."""
    reached = [ood for id_acc, ood, _, _ in points if id_acc >= level]
    return max(reached) if reached else None


def largest_gap(points: dict, arm: str, other: str, levels) -> tuple:
    """(gap, level): the largest ``frontier_arm(x) - frontier_other(x)`` over the ID levels both
    frontiers reach."""
    best = (float("-inf"), None)
    for x in levels:
        a, b = frontier_value(points[arm], x), frontier_value(points[other], x)
        if a is not None and b is not None and a - b > best[0]:
            best = (a - b, x)
    return best


def frontier_summary(records, resamples: int = 1000, seed: int = 0) -> dict:
    """At equal ID, the largest OOD gap between PSFT's frontier and each other arm's, with a
    bootstrap over seeds (the seeds resampled with replacement, jointly for every run, since a
    seed fixes the data sample and order for every arm): the point estimate and a 95% interval."""
    import random

    levels = [round(0.5 + 0.01 * i, 2) for i in range(50)]  # ID 0.50 .. 0.99
    seeds = sorted({r["seed"] for r in records})
    points = frontier_points(records)
    rng = random.Random(seed)
    out = {}
    for other in (a for a in points if a != "psft"):
        gap, level = largest_gap(points, "psft", other, levels)
        draws = []
        for _ in range(resamples):
            sample = [rng.choice(seeds) for _ in seeds]
            draws.append(largest_gap(frontier_points(records, sample), "psft", other, levels)[0])
        if level is None:  # the two frontiers share no ID level from 0.50 up
            out[other] = None
            continue
        draws.sort()
        out[other] = {"gap": gap, "at_id": level, "ci95": [draws[int(0.025 * resamples)],
                                                           draws[int(0.975 * resamples) - 1]]}
    return out


# ------------------------------------------------------------------------------------------ results
def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt_mean_std(xs, digits=3):
    """``mean ± std`` of the values that are not None; ``-`` when there are none (never nan)."""
    if all(x is None for x in xs):
        return "-"
    m, s = _mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


_fmt = fmt_mean_std  # the reports' shorthand


def matched_id(records: list, arms) -> dict:
    """OOD accuracy at the first epoch each arm reaches a common ID level: the highest level
    (rounded down to 0.05) that every *learning* arm reaches on average, i.e. the lowest of their
    best mean ID accuracies. An arm whose mean ID never rises above the base model's is not
    learning the task: it is listed, but does not set the level."""
    curves = {a: defaultdict(list) for a in arms}
    for r in records:
        if r["method"] in curves:
            curves[r["method"]][r["epoch"]].append(r)
    best, base = {}, {}
    for a, c in curves.items():
        if c:
            means = {e: statistics.fmean(x["id_acc"] for x in rs) for e, rs in c.items()}
            base[a] = means.get(0, 0.0)
            best[a] = max(v for e, v in means.items() if e > 0)
    learning = [a for a in best if best[a] > base[a]] or list(best)
    level = math.floor(min(best[a] for a in learning) * 20) / 20
    out = {"level": level, "not_learning": [a for a in best if a not in learning], "arms": {}}
    for a, c in curves.items():
        seeds = sorted({x["seed"] for rs in c.values() for x in rs})
        hits = []
        for s in seeds:
            rs = sorted((x for rs in c.values() for x in rs if x["seed"] == s),
                        key=lambda x: x["epoch"])
            first = next((x for x in rs if x["id_acc"] >= level and x["epoch"] > 0), None)
            if first:
                hits.append(first)
        out["arms"][a] = {"reached": f"{len(hits)}/{len(seeds)}",
                          "seeds": [h["seed"] for h in hits],
                          "epoch": [h["epoch"] for h in hits],
                          "id_acc": [h["id_acc"] for h in hits],
                          "ood_acc": [h.get("ood_acc") for h in hits]}  # a world may have no OOD
    return out


# ------------------------------------------------------------------------------- across bases
BASE_COMPARISONS = (("psft", "sft_paper"), ("psft", "sft"), ("psft", "sft_small"))


def sign(diffs) -> dict:
    """The sign rule every verdict uses: the seed-paired mean difference, its standard error and
    ``+``/``-`` when the mean is more than 2 standard errors above/below zero, else ``=`` (one
    seed: no standard error, so ``=``)."""
    diffs = list(diffs)
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    verdict = "="
    if mean > 2 * se:
        verdict = "+"
    elif mean < -2 * se:
        verdict = "-"
    return {"diff": mean, "se": se, "seeds": len(diffs), "sign": verdict}


def paired_difference(m: dict, arm: str, other: str) -> dict | None:
    """OOD at matched ID of ``arm`` minus ``other``'s, paired by seed (a seed fixes the data sample
    and order for every arm), by the sign rule (``sign``). None when either arm missed the level
    on a seed, or the two ran different seeds."""
    a, b = m["arms"].get(arm), m["arms"].get(other)
    if not a or not b or not _every_seed(a) or not _every_seed(b):
        return None
    ood_a, ood_b = (dict(zip(x["seeds"], x["ood_acc"])) for x in (a, b))
    if set(ood_a) != set(ood_b) or None in ood_a.values() or None in ood_b.values():
        return None
    return sign(ood_a[s] - ood_b[s] for s in sorted(ood_a))


def _every_seed(arm: dict) -> bool:
    reached, seeds = arm["reached"].split("/")
    return reached == seeds != "0"


def across_bases(folders) -> dict:
    """The main comparison's OOD at matched ID on each base (one results folder per independently
    pretrained base, ``Preset.pretrain_seed``): per base and arm the seeds' mean, the spread of
    those means across bases, and each of ``BASE_COMPARISONS`` per base (``paired_difference``)
    with a verdict over bases: ``+ on every base`` (or ``-``, ``=``) when every base gives that
    sign, else ``mixed``."""
    bases = {}
    for folder in folders:
        summary = json.loads((Path(folder) / "results.json").read_text())["summary"]
        config = summary["preset_config"]
        seed = config.get("pretrain_seed")
        if seed is None:
            seed = (config.get("base") or {}).get("pretrain_seed", Path(folder).name)
        if str(seed) in bases:
            raise ValueError(f"{folder} and {bases[str(seed)]['folder']} have the same base "
                             f"({seed}): give each base once")
        bases[str(seed)] = {"folder": str(folder), "matched_id": summary["matched_id"]}
    table = {}
    for arm in ARMS:
        per_base = {}
        for name, b in bases.items():
            hit = b["matched_id"]["arms"].get(arm)
            if hit and _every_seed(hit):  # an arm that missed the level on a seed: no mean
                per_base[name] = statistics.fmean(hit["ood_acc"])
        if not per_base:
            continue
        means = list(per_base.values())
        table[arm] = {"per_base": per_base, "mean": statistics.fmean(means),
                      "std_across_bases": statistics.stdev(means) if len(means) > 1 else 0.0}
    comparisons = {}
    for arm, other in BASE_COMPARISONS:
        per_base = {k: paired_difference(b["matched_id"], arm, other) for k, b in bases.items()}
        signs = {d["sign"] if d else None for d in per_base.values()}
        verdict = "mixed"
        if len(signs) == 1 and None not in signs:  # the same sign on every base
            verdict = f"{signs.pop()} on every base"
        comparisons[f"{arm} - {other}"] = {"per_base": per_base, "verdict": verdict}
    return {"bases": bases, "ood_at_matched_id": table, "comparisons": comparisons,
            "rule": "per base: + or - when the seed-paired mean difference of OOD at matched ID "
                    "exceeds 2 standard errors, else =; over bases: the sign when every base "
                    "gives the same one, else mixed"}


def across_bases_report(summary: dict) -> str:
    """Markdown of ``across_bases``."""
    bases = list(summary["bases"])
    lines = ["# The main comparison on independently pretrained bases", "",
             "OOD accuracy at matched ID (each base's own level), mean over data seeds; "
             "bases named by their pretraining seed; n/a: the arm missed the level on a seed. "
             "Mean and std across the bases where it is given.", "",
             "| arm | " + " | ".join(f"base {b}" for b in bases) + " | mean | std across bases |",
             "|---|" + "---|" * (len(bases) + 2)]
    for arm, row in summary["ood_at_matched_id"].items():
        cells = [f"{row['per_base'][b]:.3f}" if b in row["per_base"] else "n/a" for b in bases]
        lines.append(f"| {arm} | " + " | ".join(cells)
                     + f" | {row['mean']:.3f} | {row['std_across_bases']:.3f} |")
    lines += ["", "Levels: " + ", ".join(f"base {b} {v['matched_id']['level']:.2f}"
                                          for b, v in summary["bases"].items()), "",
              f"Rule: {summary['rule']}.", "",
              "| difference | " + " | ".join(f"base {b}" for b in bases) + " | verdict |",
              "|---|" + "---|" * (len(bases) + 1)]
    for name, c in summary["comparisons"].items():
        cells = []
        for b in bases:
            d = c["per_base"][b]
            cells.append("n/a" if d is None else f"{d['diff']:+.3f} ± {d['se']:.3f} ({d['sign']})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, p: Preset, preset_name: str, runs: list, base_path, cached, wall,
                  t_base) -> dict:
    records = [r for run in runs for r in run["records"]]
    (out / "histories").mkdir(exist_ok=True)
    for run in runs:
        j = run["job"]
        with open(_history_path(out, j.get("group", "main"), j.get("setting", j["arm"]),
                                j["seed"]), "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in run["history"])
    summary = {"preset": preset_name, "preset_config": asdict(p), "base_model": str(base_path),
               "base_loaded_from_cache": cached, "wall_seconds": wall, "pretrain_seconds": t_base,
               "run_seconds": {f"{r['job'].get('setting', r['job']['arm'])}-s{r['job']['seed']}":
                               r["seconds"] for r in runs},
               "sft_small_step_ratio": {r["job"]["seed"]: r["job"]["step_ratio"] for r in runs
                                        if r["job"]["arm"] == "sft_small"},
               "clipped_tokens": next((r["clipped_tokens"] for r in runs if r["clipped_tokens"]),
                                      None),
               "best_checkpoints": {f"{r['job']['arm']}-s{r['job']['seed']}": r["best"]
                                    for r in runs if r.get("best")}}
    (out / "results.json").write_text(json.dumps({"summary": summary, "records": records},
                                                 indent=1))
    figures = finalize(out)
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, "
          + ", ".join(str(out / f) for f in figures))
    print(f"wall time {wall / 60:.1f} min (base model {t_base / 60:.1f} min)")
    return json.loads((out / "results.json").read_text())


def _history_path(out: Path, group: str, setting: str, seed: int) -> Path:
    return out / "histories" / f"{group}-{setting}-s{seed}.jsonl".replace(" ", "_")


def load_results(out_dir) -> dict:
    """Read a results folder back: ``{"summary", "records", "runs"}``; each run has its ``job``
    (arm, seed, group, setting), its eval ``records`` and its step ``history``."""
    out = Path(out_dir)
    data = json.loads((out / "results.json").read_text())
    runs = {}
    for r in data["records"]:
        key = (r["group"], r["setting"], r["seed"])
        if key not in runs:
            path = _history_path(out, *key)
            history = ([json.loads(line) for line in path.read_text().splitlines()]
                       if path.exists() else [])
            runs[key] = {"job": {"arm": r["method"], "seed": r["seed"], "group": r["group"],
                                 "setting": r["setting"]},
                         "records": [], "history": history}
        runs[key]["records"].append(r)
    return {**data, "runs": list(runs.values())}


def finalize(out_dir) -> list:
    """Derive everything that follows from a results folder's records: the matched-ID comparison
    (into results.json), the figures and report.md. Re-runnable: no training involved."""
    out = Path(out_dir)
    data = json.loads((out / "results.json").read_text())
    main_records = [r for r in data["records"] if r["group"] == "main"]
    if main_records:
        arms = [a for a in ARMS if any(r["method"] == a for r in main_records)]
        data["summary"]["matched_id"] = matched_id(main_records, arms)
        (out / "results.json").write_text(json.dumps(data, indent=1))
    frontier = [r for r in data["records"] if r["group"] == "frontier"]
    if frontier:
        data["summary"]["frontier"] = frontier_summary(frontier)
        (out / "results.json").write_text(json.dumps(data, indent=1))
    aggregation = [r for r in data["records"] if r["group"] == "aggregation"]
    if aggregation:  # the verdict's comparison within each variant: OOD at matched ID
        data["summary"]["aggregation_matched_id"] = {
            label: matched_id([r for r in aggregation if r["setting"].endswith(", " + label)],
                              AGGREGATION_ARMS)
            for label in AGGREGATION_VARIANTS}
        (out / "results.json").write_text(json.dumps(data, indent=1))
    figures = make_figures(out)
    grad_max = {(r["job"]["group"], r["job"]["setting"], r["job"]["seed"]):
                max((h["grad_norm"] for h in r["history"]), default=None)
                for r in load_results(out)["runs"]}
    (out / "report.md").write_text(report(data["summary"], data["records"], grad_max))
    return figures


def make_figures(out_dir) -> list:
    """(Re)draw every figure of a results folder from its files."""
    out = Path(out_dir)
    res = load_results(out)
    words = world_words(res["summary"]["preset_config"])
    main_records = [r for r in res["records"] if r["group"] == "main"]
    figures = []
    if main_records:
        plots.epoch_stability(res["runs"], ARMS, words, out / "epoch_stability.png")
        figures.append("epoch_stability.png")
    if any(r.get("ood_acc") is not None for r in main_records):  # a world with OOD sets
        plots.tradeoff(main_records, ARMS, res["summary"]["matched_id"], words,
                       out / "tradeoff.png")
        figures.append("tradeoff.png")
    ablations = [r for r in res["records"] if r["group"] not in ("main", "frontier")]
    if ablations:
        plots.ablations(ablations, words, out / "ablations.png")
        figures.append("ablations.png")
    frontier = [r for r in res["records"] if r["group"] == "frontier"]
    if frontier:
        plots.frontier(frontier_points(frontier), res["summary"]["frontier"],
                       out / "frontier.png")
        figures.append("frontier.png")
    return figures


def report(summary: dict, records: list, grad_max: dict | None = None) -> str:
    """Markdown tables of the numbers (mean ± std over seeds), written from the records."""
    words = world_words(summary["preset_config"])
    lines = [f"# SFT vs PSFT {words.title}: results of preset `{summary['preset']}`", "",
             f"Wall time {summary['wall_seconds'] / 60:.1f} min "
             f"(base model {summary['pretrain_seconds'] / 60:.1f} min, "
             f"{'loaded' if summary['base_loaded_from_cache'] else 'pretrained in this run'}). "
             "Values are mean ± std over seeds.", ""]
    main = [r for r in records if r["group"] == "main"]
    if main:
        last = max(r["epoch"] for r in main)
        keys = list(words.columns)
        if words.per_set:
            keys += sorted({k for r in main for k in r if k.startswith("ood_")} - set(keys))
        keys = [k for k in keys if any(r.get(k) is not None for r in main)]  # never a nan column
        lines += ["## Per epoch (main comparison)", "",
                  "| arm | epoch | " + " | ".join(keys) + " | train_entropy | clipfrac |",
                  "|---|---|" + "---|" * (len(keys) + 2)]
        for arm in ARMS:
            for e in range(last + 1):
                rs = [r for r in main if r["method"] == arm and r["epoch"] == e]
                if rs:
                    cells = [_fmt([r.get(k) for r in rs]) for k in keys]
                    extra = [_fmt([r["train_entropy"] for r in rs]) if e else "",
                             _fmt([r["clipfrac"] for r in rs]) if e else ""]
                    lines.append(f"| {arm} | {e} | " + " | ".join(cells + extra) + " |")
        m = summary["matched_id"]
        has_ood = any(r.get("ood_acc") is not None for r in main)
    if main and has_ood:  # a world without OOD sets has no trade-off to report
        lines += ["", f"## OOD at matched ID (first epoch with id_acc >= {m['level']:.2f})", "",
                  "The level is the highest that every arm learning the task reaches on average"
                  + (f"; not learning (mean ID never above the base's): "
                     f"{', '.join(m['not_learning'])}"
                     if m.get("not_learning") else "") + ".", "",
                  "| arm | seeds reaching | epoch | id_acc | ood_acc |", "|---|---|---|---|---|"]
        for arm, v in m["arms"].items():
            lines.append(f"| {arm} | {v['reached']} | {v['epoch']} | {_fmt(v['id_acc'])} | "
                         f"{_fmt(v['ood_acc'])} |")
    if main and summary["sft_small_step_ratio"]:
        lines += ["", "sft_small lr = lr x (PSFT drift / SFT drift after epoch 1): ratio per seed "
                  + ", ".join(f"{k}: {v:.3f}" for k, v in summary["sft_small_step_ratio"].items())]
    ct = summary.get("clipped_tokens")
    if ct:
        lines += ["", "## Which tokens PSFT clips (psft, first seed, all steps)", "",
                  "| role | tokens seen | share of tokens | clipped | clip rate "
                  "| share of clipped |",
                  "|---|---|---|---|---|---|"]
        for role in ct["seen"]:
            lines.append(f"| {role} | {ct['seen'][role]} | {ct['share_of_tokens'][role]:.3f} | "
                         f"{ct['clipped'].get(role, 0)} | {ct['clip_rate'][role]:.4f} | "
                         f"{ct['share_of_clipped'][role]:.3f} |")
        lines += ["", "Most clipped tokens: "
                  + ", ".join(f"`{t}` {n}" for t, n in ct["top_tokens"])]
    abl = [r for r in records if r["group"] != "main"]
    if abl:
        lines += ["", "## Ablations (PSFT; at the last epoch and at the best-ID epoch)", "",
                  "| ablation | setting | id_acc (last) | ood_acc (last) | entropy (last) "
                  "| best id_acc | ood at best id | max grad norm |",
                  "|---|---|---|---|---|---|---|---|"]
        last = max(r["epoch"] for r in abl)
        for group in dict.fromkeys(r["group"] for r in abl):
            for setting in dict.fromkeys(r["setting"] for r in abl if r["group"] == group):
                rs = [r for r in abl if r["group"] == group and r["setting"] == setting]
                end = [r for r in rs if r["epoch"] == last]
                best = [max((r for r in rs if r["seed"] == s and r["epoch"] > 0),
                            key=lambda r: r["id_acc"])
                        for s in sorted({r["seed"] for r in rs})]
                grads = [(grad_max or {}).get((group, setting, r["seed"])) for r in end]
                lines.append(f"| {group} | {setting} | {_fmt([r['id_acc'] for r in end])} | "
                             f"{_fmt([r['ood_acc'] for r in end])} | "
                             f"{_fmt([r['entropy'] for r in end])} | "
                             f"{_fmt([r['id_acc'] for r in best])} | "
                             f"{_fmt([r['ood_acc'] for r in best])} | {_fmt(grads, 1)} |")
    if summary.get("frontier"):
        lines += ["", "## The lr frontier: OOD vs ID over every lr and epoch", "",
                  "Frontier of an arm at ID level x: the best OOD among its (lr, epoch) points "
                  "(means over seeds) with ID >= x. Gap: the largest PSFT-minus-other frontier "
                  "difference over the ID levels 0.50-0.99 both reach; 95% interval from 1000 "
                  "bootstrap resamples of the seeds.", "",
                  "| PSFT vs | largest OOD gap at equal ID | at ID | 95% interval |",
                  "|---|---|---|---|"]
        for other, g in summary["frontier"].items():
            if g is None:
                lines.append(f"| {other} | no common ID level >= 0.50 | | |")
                continue
            lines.append(f"| {other} | {g['gap']:+.3f} | {g['at_id']} | "
                         f"[{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] |")
    if summary.get("aggregation_matched_id"):
        lines += ["", "## Aggregation and warm-up: OOD at matched ID within each variant", "",
                  "Each variant's level is the highest ID every learning arm reaches in it.", "",
                  "| variant | level | arm | seeds reaching | epoch | id_acc | ood_acc |",
                  "|---|---|---|---|---|---|---|"]
    for label, m in summary.get("aggregation_matched_id", {}).items():
        for arm, v in m["arms"].items():
            lines.append(f"| {label} | {m['level']:.2f} | {arm} | {v['reached']} | {v['epoch']} | "
                         f"{_fmt(v['id_acc'])} | {_fmt(v['ood_acc'])} |")
    return "\n".join(lines) + "\n"
