"""The RL experiment: GRPO from the base model and from the SFT and PSFT checkpoints
(paper claim 6).

``python -m minipsft reproduce-rl --preset cpu --out DIR``

1. Fine-tunes the toy world's base model with ``psft``, ``sft_paper`` and ``sft`` exactly as
   ``reproduce`` does (same preset, data, order and seeds), keeping each run's **best-ID epoch**:
   the paper started RL from each method's best in-domain checkpoint, and at that point each method
   is as good as it gets in domain, so RL starts from each method's own best trade-off rather than
   from an arbitrary epoch. Results of this stage: ``DIR/finetune/`` (a full ``reproduce`` folder).
2. Runs GRPO (``rl.grpo``) from the base and from each checkpoint: the same RL steps, prompts (ID
   prompts never used in fine-tuning), sampling seed and settings for every start; reward = the ID
   task's answer checker. Evaluates ID/OOD accuracy, format following and entropy every
   ``eval_every`` steps.
3. Writes ``DIR/results.json`` (records: ``start``, ``seed``, ``step``, ``reward``, ``id_acc``,
   ``ood_acc``, ``entropy``, ...), ``DIR/histories/``, ``DIR/report.md`` and
   ``DIR/rl_after_finetuning.png``.
"""
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from . import plots
from .experiments import PRESETS, fmt_mean_std, reproduce, run_jobs, same_preset
from .model import CausalLM
from .rl import GRPOConfig, grpo
from .worlds import make_world, world_words

STARTS = ("base", "sft_paper", "sft", "psft")

_fmt = fmt_mean_std  # the report's shorthand


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
    return {"start": job["start"], "seed": job["seed"], "records": records, "history": hist,
            "seconds": time.perf_counter() - t0}


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
    cache_dir = Path(cache_dir or os.environ.get("MINIPSFT_CACHE",
                                                 Path.home() / ".cache" / "minipsft"))
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
    runs.sort(key=lambda r: (r["seed"], STARTS.index(r["start"])))
    (out / "histories").mkdir(exist_ok=True)
    for r in runs:
        (out / "histories" / f"{r['start']}-s{r['seed']}.jsonl").write_text(
            "".join(json.dumps(h) + "\n" for h in r["history"]))
    summary = {"preset": preset_name, "rl_config": asdict(rp), "finetune_config": asdict(p),
               "best_checkpoints": best, "wall_seconds": time.perf_counter() - t0,
               "pretrain_seconds": t_base, "finetune_seconds": t_ft - t_base,
               "run_seconds": {f"{r['start']}-s{r['seed']}": r["seconds"] for r in runs}}
    records = [x for r in runs for x in r["records"]]
    (out / "results.json").write_text(json.dumps({"summary": summary, "records": records},
                                                 indent=1))
    finalize_rl(out)
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'rl_after_finetuning.png'}")
    print(f"wall time {summary['wall_seconds'] / 60:.1f} min (base model {t_base / 60:.1f} min, "
          f"fine-tuning with the RL runs from the base beside it {(t_ft - t_base) / 60:.1f} min)")
    return load_rl_results(out)


def finalize_rl(out_dir) -> None:
    """Rebuild an RL results folder's figure and report from its files (no training)."""
    out = Path(out_dir)
    res = load_rl_results(out)
    words = world_words(res["summary"]["finetune_config"])
    plots.rl_after_finetuning(res["runs"], words, out / "rl_after_finetuning.png")
    (out / "report.md").write_text(report(res["summary"], res["records"], res["runs"]))


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


def load_rl_results(out_dir) -> dict:
    """``{"summary", "records", "runs"}``; each run: ``start``, ``seed``, eval ``records``, step
    ``history``."""
    out = Path(out_dir)
    data = json.loads((out / "results.json").read_text())
    runs = []
    for start, seed in dict.fromkeys((r["start"], r["seed"]) for r in data["records"]):
        path = out / "histories" / f"{start}-s{seed}.jsonl"
        runs.append({"start": start, "seed": seed,
                     "history": [json.loads(x) for x in path.read_text().splitlines()],
                     "records": [r for r in data["records"]
                                 if r["start"] == start and r["seed"] == seed]})
    return {**data, "runs": runs}


def reproduce_rl_or_load(preset_name: str, out_dir, **kw) -> dict:
    """Load ``out_dir`` when it was made with this preset's settings, else run ``reproduce_rl``."""
    path = Path(out_dir) / "results.json"
    if path.exists():
        res = load_rl_results(out_dir)
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


def report(summary: dict, records: list, runs: list = ()) -> str:
    """Markdown: the best-ID checkpoints RL started from, the rollout statistics per start (from the
    step histories of ``runs``), then every evaluation; mean ± std over seeds."""
    rp = summary["rl_config"]
    words = world_words(summary["finetune_config"])
    lines = [f"# GRPO after fine-tuning {words.title}, preset `{summary['preset']}`", "",
             f"Wall time {summary['wall_seconds'] / 60:.1f} min "
             f"(base model {summary.get('pretrain_seconds', 0) / 60:.1f} min, "
             f"fine-tuning {summary['finetune_seconds'] / 60:.1f} min). "
             f"{rp['steps']} RL steps of {rp['prompts_per_step']} prompts x {rp['group_size']} "
             f"samples, minibatch {rp['minibatch_size']}, lr {rp['lr']}. "
             f"Values are mean ± std over seeds.", ""]
    if summary["best_checkpoints"]:
        lines += ["## Starting checkpoints (best-ID epoch of each fine-tuning run)", "",
                  "| run | epoch | id_acc |", "|---|---|---|"]
        lines += [f"| {k} | {v['epoch']} | {v['id_acc']:.3f} |"
                  for k, v in summary["best_checkpoints"].items()]
        lines.append("")
    if runs:
        k = max(1, rp["eval_every"])
        lines += [f"## Rollouts (per seed, then mean ± std): reward over the first and last {k} "
                  f"steps, and per step", "",
                  "| start | reward first | reward last | groups with equal rewards "
                  "| clipfrac_high | clipfrac_low |", "|---|---|---|---|---|---|"]
        for start in STARTS:
            hs = [r["history"] for r in runs if r["start"] == start]
            if hs:
                cells = [[statistics.fmean(x["reward"] for x in h[:k]) for h in hs],
                         [statistics.fmean(x["reward"] for x in h[-k:]) for h in hs]]
                cells += [[statistics.fmean(x[key] for x in h) for h in hs]
                          for key in ("zero_adv_groups", "clipfrac_high", "clipfrac_low")]
                lines.append(f"| {start} | " + " | ".join(_fmt(c, 4 if i > 2 else 3)
                                                          for i, c in enumerate(cells)) + " |")
        lines.append("")
    keys = ("reward", "id_acc", "ood_acc", "ood_format", "sample_entropy", "rollout_entropy",
            "ood_kl", "entropy")
    keys = [k for k in keys if any(r.get(k) is not None for r in records)]  # the world's metrics
    lines += ["## Along RL", "", "| start | step | " + " | ".join(keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for start in STARTS:
        for step in sorted({r["step"] for r in records if r["start"] == start}):
            rs = [r for r in records if r["start"] == start and r["step"] == step]
            lines.append(f"| {start} | {step} | " + " | ".join(_fmt([r.get(k) for r in rs])
                                                               for k in keys) + " |")
    return "\n".join(lines) + "\n"
