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

RL stage (``reproduce-rl``, ``reproduce_rl``): fine-tunes ``psft``, ``sft_paper`` and ``sft`` as
above, keeping each run's best-ID epoch (the paper started RL there), then runs GRPO (``rl.grpo``)
from the base and from each checkpoint with the same prompts, steps and sampling seed, reward = the
world's checker. Both stages write the same kind of folder (``save_folder``/``load_results``), and
``finalize`` rebuilds either's report and figures from its files.
"""
import json
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
from ..losses import LOSSES
from ..model import CausalLM
from .reports import arms_of, frontier_points, frontier_summary, matched_id, report, rl_report
from .rl import GRPOConfig, grpo
from ..logprobs import heldout_eval
from ..train import TrainConfig, train
from .worlds import ToyWorld, make_world, world_words

# one arm per registered loss (losses.LOSSES, at PSFT's schedule and lr), plus two SFT controls
ARMS = tuple(LOSSES) + ("sft_paper", "sft_small")
ABLATIONS = ("refresh", "eps", "warmup", "aggregation", "frontier", "sawtooth")
# the "sawtooth" runs: held-out entropy at every step within this many steps of an epoch boundary
SAWTOOTH_ARMS, SAWTOOTH_STEPS, SAWTOOTH_ROWS = ("psft", "sft", "sft_paper"), 4, 128
# the "frontier" sweep: the controlled arms at 6 lrs, from 3e-5 to 1e-2 (the cpu preset's 1e-4
# near the bottom; at 1e-2 plain SFT no longer learns the task: where a trust region should pay),
# paper-recipe SFT at 3 (its 2e-3 in the middle)
FRONTIER_ARMS = ("psft", "sft", "sft_kl")
FRONTIER_LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
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
    # the second size (issue 18): the cpu preset with a 4x wider base (3.4M parameters, 0.86M in
    # cpu); pretraining lr lowered with the width, everything else as cpu
    "cpu_wide": Preset(base=toy.BaseConfig(hidden=256, heads=8, pretrain_lr=2e-3)),
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
def cache_folder(cache_dir=None) -> Path:
    """Where base models are cached: ``cache_dir``, else $MINIPSFT_CACHE, else ~/.cache/minipsft."""
    return Path(cache_dir or os.environ.get("MINIPSFT_CACHE", Path.home() / ".cache" / "minipsft"))


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
    cache_dir = cache_folder(cache_dir)
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
                "cpu": "9 min on 2 CPU cores",
                "cpu_wide": "56 min on 2 CPU cores, 25 of them pretraining the base",
                "gpu": "11 min on one H200 (estimated from benchmarks/gpu_preset_probe.py; no gpu "
                "results are committed yet)"}


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


def write_results(out: Path, p: Preset, preset_name: str, runs: list, base_path, cached, wall,
                  t_base) -> dict:
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
    save_folder(out, summary, runs)
    figures = finalize(out)
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, "
          + ", ".join(str(out / f) for f in figures))
    print(f"wall time {wall / 60:.1f} min (base model {t_base / 60:.1f} min)")
    return load_results(out)


# ------------------------------------------------------------ results folders (both stages)
def history_name(job: dict) -> str:
    """A run's history file: ``GROUP-SETTING-sSEED`` (fine-tuning) or ``START-sSEED`` (RL)."""
    if "start" in job:
        return f"{job['start']}-s{job['seed']}"
    name = f"{job.get('group', 'main')}-{job.get('setting', job['arm'])}-s{job['seed']}"
    return name.replace(" ", "_")


def save_folder(out: Path, summary: dict, runs: list) -> None:
    """A results folder, whatever the stage: ``results.json`` (the summary and every run's eval
    records) and ``histories/NAME.jsonl``, one line per optimizer step of each run."""
    (out / "histories").mkdir(exist_ok=True)
    for run in runs:
        (out / "histories" / f"{history_name(run['job'])}.jsonl").write_text(
            "".join(json.dumps(h) + "\n" for h in run["history"]))
    records = [x for run in runs for x in run["records"]]
    (out / "results.json").write_text(json.dumps({"summary": summary, "records": records},
                                                 indent=1))


def load_results(out_dir) -> dict:
    """Read a results folder back (fine-tuning or RL): ``{"summary", "records", "runs"}``; each
    run has its ``job`` (fine-tuning: arm, seed, group, setting; RL: start, seed), its eval
    ``records`` and its step ``history``."""
    out = Path(out_dir)
    data = json.loads((out / "results.json").read_text())
    rl = "rl_config" in data["summary"]
    runs = {}
    for r in data["records"]:
        job = {"start": r["start"], "seed": r["seed"]} if rl else {
            "arm": r["method"], "seed": r["seed"], "group": r["group"], "setting": r["setting"]}
        key = tuple(job.values())
        if key not in runs:
            path = out / "histories" / f"{history_name(job)}.jsonl"
            history = ([json.loads(line) for line in path.read_text().splitlines()]
                       if path.exists() else [])
            runs[key] = {"job": job, "records": [], "history": history}
        runs[key]["records"].append(r)
    return {**data, "runs": list(runs.values())}


def finalize(out_dir) -> list:
    """Derive everything that follows from a results folder's records (either stage): the
    matched-ID comparison and frontier (into results.json), the figures and report.md.
    Re-runnable: no training involved. Returns the figures' file names."""
    out = Path(out_dir)
    data = json.loads((out / "results.json").read_text())
    if "rl_config" in data["summary"]:
        res = load_results(out)
        words = world_words(res["summary"]["finetune_config"])
        plots.rl_after_finetuning(res["runs"], words, out / "rl_after_finetuning.png")
        (out / "report.md").write_text(rl_report(res["summary"], res["records"], res["runs"]))
        return ["rl_after_finetuning.png"]
    main_records = [r for r in data["records"] if r["group"] == "main"]
    if main_records:
        # in ARMS order (then any arm of a loss registered later), whatever order the runs took
        arms = sorted(arms_of(main_records), key=lambda a: (ARMS + (a,)).index(a))
        data["summary"]["matched_id"] = matched_id(main_records, arms)
    frontier = [r for r in data["records"] if r["group"] == "frontier"]
    if frontier:
        data["summary"]["frontier"] = frontier_summary(frontier)
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
    """(Re)draw every figure of a fine-tuning results folder from its files."""
    out = Path(out_dir)
    res = load_results(out)
    words = world_words(res["summary"]["preset_config"])
    main_records = [r for r in res["records"] if r["group"] == "main"]
    figures = []
    arms = list(res["summary"].get("matched_id", {}).get("arms", ARMS))  # finalize's order
    if main_records:
        plots.epoch_stability(res["runs"], arms, words, out / "epoch_stability.png")
        figures.append("epoch_stability.png")
    if any(r.get("ood_acc") is not None for r in main_records):  # a world with OOD sets
        plots.tradeoff(main_records, arms, res["summary"]["matched_id"], words,
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


# ------------------------------------------------- the RL stage (paper claim 6): GRPO after SFT
STARTS = ("base", "sft_paper", "sft", "psft")

@dataclass
class RLPreset:
    """Sizes of the RL stage. The fine-tuning before it uses ``experiments.PRESETS`` of the same
    name. The cpu lr (1e-4, the fine-tuning lr) was tried on the base model alone before any run
    from a checkpoint: GRPO took the base's ID accuracy from 0.43 to 0.74 in 60 steps with OOD
    unchanged."""
    steps: int = 60
    prompts_per_step: int = 16
    group_size: int = 8
    minibatch_size: int = 32
    lr: float = 1e-4
    eval_every: int = 10
    n_prompts: int = 512
    starts: tuple = STARTS


RL_PRESETS = {
    "smoke": RLPreset(steps=8, prompts_per_step=8, group_size=4, minibatch_size=8, lr=1e-3,
                      eval_every=4, n_prompts=64),
    "cpu": RLPreset(),
    "gpu": RLPreset(steps=200, prompts_per_step=32, group_size=8, minibatch_size=64, lr=5e-5,
                    eval_every=20, n_prompts=4096),
    # after 'compare' on a user's files and model: the training rows' prompts, exact-match reward
    "files": RLPreset(steps=20, prompts_per_step=8, group_size=4, minibatch_size=8, lr=1e-6,
                      eval_every=5, n_prompts=256),
}


def run_rl_one(job: dict) -> dict:
    """GRPO from one starting model and seed, with the world's prompts, reward and evaluator; eval
    records (with the mean rollout reward and entropy since the previous evaluation) and the
    per-step history."""
    torch.set_num_threads(job["threads"])
    p, rp = job["preset"], job["rl"]
    world = make_world(p)
    base = CausalLM.from_pretrained(job["base_path"], device=job["device"], dtype=world.dtype)
    lm = CausalLM.from_pretrained(job["start_path"], device=job["device"], dtype=world.dtype)
    evaluator = world.evaluator(base)
    del base
    cfg = GRPOConfig(steps=rp.steps, prompts_per_step=rp.prompts_per_step, group_size=rp.group_size,
                     minibatch_size=rp.minibatch_size, lr=rp.lr, eval_every=rp.eval_every,
                     max_new_tokens=world.max_new_tokens(), seed=job["seed"], progress=False)
    t0 = time.perf_counter()
    prompts = world.rl_prompts(rp.n_prompts, job["seed"])
    result = grpo(lm, prompts, world.reward, cfg, eval_fn=evaluator)
    hist, records, prev = result["history"], [], 0
    for ev in result["evals"]:
        # step 0: the first rollout (sampled before any update); later: the rollouts since the
        # last eval
        window = (hist[:1] if ev["step"] == 0
                  else [h for h in hist if prev < h["step"] <= ev["step"]])
        records.append({"start": job["start"], "seed": job["seed"], **ev,
                        "reward": statistics.fmean(h["reward"] for h in window),
                        "rollout_entropy": statistics.fmean(h["entropy"] for h in window)})
        prev = ev["step"]
    return {"job": {"start": job["start"], "seed": job["seed"]}, "records": records,
            "history": hist, "seconds": time.perf_counter() - t0}


def reproduce_rl(preset_name: str, out_dir, cache_dir=None, seeds=None, workers=None,
                 device: str = "auto", finetune: dict | None = None, **overrides) -> dict:
    """Fine-tune (or reuse an earlier fine-tuning of ``out_dir/finetune`` made with the same
    settings), then run GRPO from every start; write every results file and the figure into
    ``out_dir``. The runs from the base model go beside the fine-tuning runs. ``finetune``: any
    ``experiments.Preset`` field (e.g. the files world's model and files); ``overrides``: any
    ``RLPreset`` field."""
    if preset_name not in RL_PRESETS:
        raise ValueError(f"preset {preset_name!r}: choose one of {', '.join(RL_PRESETS)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rp = replace(RL_PRESETS[preset_name], **overrides)
    unknown = set(rp.starts) - set(STARTS)
    if unknown:
        raise ValueError(f"starts {sorted(unknown)}: choose from {', '.join(STARTS)}")
    finetune = dict(finetune or {})
    if seeds:
        finetune["seeds"] = tuple(seeds)
    if workers:
        finetune["workers"] = workers
    p = replace(PRESETS[preset_name], **finetune)
    world = make_world(p)  # checks the settings and the user's files first
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_folder(cache_dir)
    t0 = time.perf_counter()
    tuned = tuple(s for s in rp.starts if s != "base")
    base_path = world.base_model(cache_dir, device)[0]  # (path, how, pretrained now)
    t_base = time.perf_counter() - t0
    job0 = dict(preset=p, rl=rp, base_path=str(base_path), device=device, threads=p.threads)
    base_jobs = [dict(job0, start="base", seed=seed, start_path=str(base_path))
                 for seed in p.seeds if "base" in rp.starts]
    runs = []
    best = _finetuned(out / "finetune", replace(p, arms=tuned)) if tuned else {}
    if best is None:
        # RL from the base needs no checkpoint: it runs in one more process beside the fine-tuning
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as side:
            pending = [side.submit(run_rl_one, j) for j in base_jobs]
            ft = reproduce(preset_name, out / "finetune", cache_dir=cache_dir, device=device,
                           save_best=True, **dict(finetune, arms=tuned))
            runs += [f.result() for f in pending]
        best, base_jobs = ft["summary"]["best_checkpoints"], []
    t_ft = time.perf_counter() - t0
    jobs = base_jobs + [dict(job0, start=s, seed=seed, start_path=best[f"{s}-s{seed}"]["path"])
                        for seed in p.seeds for s in tuned]
    runs += run_jobs(jobs, p.workers, "grpo runs", fn=run_rl_one)
    runs.sort(key=lambda r: (r["job"]["seed"], STARTS.index(r["job"]["start"])))
    summary = {"preset": preset_name, "rl_config": asdict(rp), "finetune_config": asdict(p),
               "best_checkpoints": best, "wall_seconds": time.perf_counter() - t0,
               "pretrain_seconds": t_base, "finetune_seconds": t_ft - t_base,
               "run_seconds": {history_name(r["job"]): r["seconds"] for r in runs}}
    save_folder(out, summary, runs)
    finalize(out)
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'rl_after_finetuning.png'}")
    print(f"wall time {summary['wall_seconds'] / 60:.1f} min (base model {t_base / 60:.1f} min, "
          f"fine-tuning with the RL runs from the base beside it {(t_ft - t_base) / 60:.1f} min)")
    return load_results(out)


def _finetuned(folder: Path, p) -> dict | None:
    """The best-ID checkpoints of an earlier fine-tuning stage in ``folder`` when it was made with
    the same settings and every checkpoint is still there (so RL settings can change without
    fine-tuning again)."""
    path = folder / "results.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())["summary"]
    same = same_preset(summary["preset_config"], p)
    best = summary.get("best_checkpoints") or {}
    wanted = {f"{a}-s{s}" for a in p.arms for s in p.seeds}
    if same and set(best) == wanted and all((Path(v["path"]) / "config.json").exists()
                                            for v in best.values()):
        print(f"reusing the fine-tuned checkpoints of {folder} (same settings)")
        return best
    return None


def reproduce_rl_or_load(preset_name: str, out_dir, **kw) -> dict:
    """Load ``out_dir`` when it was made with this preset's settings, else run ``reproduce_rl``."""
    path = Path(out_dir) / "results.json"
    if path.exists():
        res = load_results(out_dir)
        rp = replace(RL_PRESETS[preset_name],
                     **{k: v for k, v in kw.items() if k in asdict(RL_PRESETS[preset_name])})
        same_rl = res["summary"]["rl_config"] == json.loads(json.dumps(asdict(rp)))
        same_ft = same_preset(res["summary"]["finetune_config"],
                              replace(PRESETS[preset_name], **(kw.get("finetune") or {})))
        if res["summary"]["preset"] == preset_name and same_rl and same_ft:
            print(f"loaded results from {path} (made with the same '{preset_name}' settings; "
                  f"delete the folder to run again)")
            return res
    return reproduce_rl(preset_name, out_dir, **kw)
