"""The RL stage (paper claim 6): ``reproduce-rl`` fine-tunes ``psft``, ``sft_paper`` and ``sft`` as
``runner.reproduce`` does, keeping each run's best-ID epoch (the paper started RL there), then runs
GRPO (``rl.grpo``) from the base and from each checkpoint with the same prompts, steps and sampling
seed, reward = the world's checker, into a results folder (``results.save_folder``)."""
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from ..model import CausalLM
from .presets import PRESETS, RL_PRESETS, STARTS, cache_folder, same_preset
from .records import RLJob, Run, Site
from .results import finalize, load_results, save_folder
from .rl import GRPOConfig, grpo
from .runner import reproduce, run_jobs, run_store
from .worlds import make_world


def run_rl_one(job: RLJob) -> Run:
    """GRPO from one start and seed: eval records (with the mean rollout reward and entropy since
    the previous evaluation) and the per-step history."""
    site, rp = job.site, job.rl
    torch.set_num_threads(site.threads)
    world = make_world(site.preset)
    base = CausalLM.from_pretrained(site.base_path, device=site.device, dtype=world.dtype)
    lm = CausalLM.from_pretrained(job.start_path, device=site.device, dtype=world.dtype)
    evaluator = world.evaluator(base)
    del base
    cfg = GRPOConfig(steps=rp.steps, prompts_per_step=rp.prompts_per_step, group_size=rp.group_size,
                     minibatch_size=rp.minibatch_size, lr=rp.lr, eval_every=rp.eval_every,
                     max_new_tokens=world.max_new_tokens(), seed=job.seed, progress=False)
    t0 = time.perf_counter()
    prompts = world.rl_prompts(rp.n_prompts, job.seed)
    result = grpo(lm, prompts, world.reward, cfg, eval_fn=evaluator)
    hist, records, prev = result["history"], [], 0
    for ev in result["evals"]:
        # step 0: the first rollout (before any update); later: the rollouts since the last eval
        window = (hist[:1] if ev["step"] == 0
                  else [h for h in hist if prev < h["step"] <= ev["step"]])
        records.append({"start": job.start, "seed": job.seed, **ev,
                        "reward": statistics.fmean(h["reward"] for h in window),
                        "rollout_entropy": statistics.fmean(h["entropy"] for h in window)})
        prev = ev["step"]
    return Run(job, records, hist, time.perf_counter() - t0)


def reproduce_rl(preset_name: str, out_dir, cache_dir=None, seeds=None, workers=None,
                 device: str = "auto", finetune: dict | None = None,
                 max_minutes: float | None = None, overwrite: bool = False, **overrides) -> dict:
    """Fine-tune (or reuse ``out_dir/finetune`` made with the same settings), then run GRPO from
    every start into ``out_dir``. ``finetune``: ``Preset`` fields; ``overrides``: ``RLPreset``
    fields. The same call resumes (``max_minutes``, ``overwrite``: as ``runner.reproduce``)."""
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    if preset_name not in RL_PRESETS:
        raise ValueError(f"preset {preset_name!r}: choose one of {', '.join(RL_PRESETS)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rp = replace(RL_PRESETS[preset_name], **overrides)
    if set(rp.starts) - set(STARTS):
        raise ValueError(f"starts {sorted(set(rp.starts) - set(STARTS))}: choose from "
                         f"{', '.join(STARTS)}")
    finetune = dict(finetune or {})
    finetune |= {k: v for k, v in dict(seeds=tuple(seeds or ()), workers=workers).items() if v}
    p = replace(PRESETS[preset_name], **finetune)
    world = make_world(p)  # checks the settings and the user's files first
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tuned = tuple(s for s in rp.starts if s != "base")
    base_path = world.base_model(cache_folder(cache_dir), device)[0]  # (path, how, pretrained)
    t_base = time.perf_counter() - t0
    site = Site(p, str(base_path), device, p.threads)
    base_jobs = [RLJob("base", seed, str(base_path), rp, site)
                 for seed in p.seeds if "base" in rp.starts]
    store = run_store(out, preset_name, replace(p, arms=tuned), device, overwrite, asdict(rp))
    runs = []
    best = finetuned(out / "finetune", replace(p, arms=tuned)) if tuned else {}
    if best is None:
        # RL from the base needs no checkpoint: it runs in one more process beside the fine-tuning
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as side:
            pending = side.submit(run_jobs, base_jobs, 1, "grpo from the base", run_rl_one, store,
                                  deadline)
            left = None if deadline is None else (deadline - time.time()) / 60
            ft = reproduce(preset_name, out / "finetune", cache_dir=cache_dir, device=device,
                           save_best=True, max_minutes=left, overwrite=overwrite,
                           **dict(finetune, arms=tuned))
            runs += pending.result()
        best, base_jobs = ft["summary"]["best_checkpoints"], []
    t_ft = time.perf_counter() - t0
    jobs = base_jobs + [RLJob(s, seed, best[f"{s}-s{seed}"]["path"], rp, site)
                        for seed in p.seeds for s in tuned]
    runs += run_jobs(jobs, p.workers, "grpo runs", fn=run_rl_one, store=store, deadline=deadline)
    runs.sort(key=lambda r: (r.job.seed, STARTS.index(r.job.start)))
    summary = {"preset": preset_name, "rl_config": asdict(rp), "finetune_config": asdict(p),
               "best_checkpoints": best, "wall_seconds": time.perf_counter() - t0,
               "pretrain_seconds": t_base, "finetune_seconds": t_ft - t_base,
               "run_seconds": {r.job.name: r.seconds for r in runs}}
    save_folder(out, summary, runs)
    finalize(out)
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'rl_after_finetuning.png'}")
    print(f"wall time {summary['wall_seconds'] / 60:.1f} min (base model {t_base / 60:.1f} min, "
          f"fine-tuning with the RL runs from the base beside it {(t_ft - t_base) / 60:.1f} min)")
    return load_results(out)


def finetuned(folder: Path, p) -> dict | None:
    """The best-ID checkpoints in ``folder`` when made with the same settings and all still there
    (so RL settings can change without fine-tuning again)."""
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
