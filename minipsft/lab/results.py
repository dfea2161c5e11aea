"""Results folders, of either stage: ``results.json`` (a summary and every run's eval records) and
``histories/NAME.jsonl`` (each run's steps), typed records (``records.py``) in memory; and what
``finalize`` derives from the files again, with no training."""
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from . import plots
from .ablations import ABLATIONS
from .presets import ARMS, Preset, RLPreset, differences
from .records import Folder, Job, RLJob, Run
from .store import write_atomic
from .reports import arms_of, matched_id, report, rl_report
from .worlds import world_words


def save_folder(out: Path, summary: dict, runs: list) -> None:
    """Write a results folder, whatever the stage: ``results.json`` and the histories."""
    (out / "histories").mkdir(exist_ok=True)
    for run in runs:
        (out / "histories" / f"{run.job.name}.jsonl").write_text(
            "".join(json.dumps(h) + "\n" for h in run.history))
    records = [x for run in runs for x in run.records]
    (out / "results.json").write_text(json.dumps({"summary": summary, "records": records},
                                                 indent=1))


def read_folder(out_dir) -> Folder:
    """Read a results folder back: its summary, records and runs (a run's job from its records)."""
    out = Path(out_dir)
    data = json.loads((out / "results.json").read_text())
    # the one place the stage is told from the files: the RL stage's summary holds its rl_config
    stage = RLJob if "rl_config" in data["summary"] else Job
    runs = {}
    for r in data["records"]:
        job = stage.of_record(r)
        if job.name not in runs:
            path = out / "histories" / f"{job.name}.jsonl"
            history = ([json.loads(line) for line in path.read_text().splitlines()]
                       if path.exists() else [])
            runs[job.name] = Run(job, [], history)
        runs[job.name].records.append(r)
    return Folder(stage, data["summary"], data["records"], list(runs.values()))


def load_results(out_dir) -> dict:
    """A results folder (either stage) as ``{"summary", "records", "runs"}``; each run a ``Run``."""
    folder = read_folder(out_dir)
    return {"summary": folder.summary, "records": folder.records, "runs": folder.runs}


def write_results(out: Path, p: Preset, preset_name: str, runs: list, base_path, cached, wall,
                  t_base) -> dict:
    """Write a fine-tuning results folder, finalize it and read it back."""
    summary = {"preset": preset_name, "preset_config": asdict(p), "base_model": str(base_path),
               "base_loaded_from_cache": cached, "wall_seconds": wall, "pretrain_seconds": t_base,
               "run_seconds": {f"{r.job.setting}-s{r.job.seed}": r.seconds for r in runs},
               "sft_small_step_ratio": {r.job.seed: r.job.step_ratio for r in runs
                                        if r.job.arm == "sft_small"},
               "clipped_tokens": next((r.clipped_tokens for r in runs if r.clipped_tokens), None),
               "best_checkpoints": {f"{r.job.arm}-s{r.job.seed}": r.best for r in runs if r.best}}
    save_folder(out, summary, runs)
    figures = finalize(out)
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, "
          + ", ".join(str(out / f) for f in figures))
    print(f"wall time {wall / 60:.1f} min (base model {t_base / 60:.1f} min)")
    return load_results(out)


def finalize(out_dir) -> list:
    """Derive from a results folder's records (either stage) the matched-ID comparison and each
    ablation's summary (into results.json), the figures and report.md; the figures' names."""
    out = Path(out_dir)
    folder = read_folder(out)
    if folder.stage is RLJob:
        return _finalize_rl(out, folder)
    summary, records = folder.summary, folder.records
    main = [r for r in records if r["group"] == "main"]
    if main:
        # in ARMS order (then any arm of a loss registered later), whatever order the runs took
        arms = sorted(arms_of(main), key=lambda a: (ARMS + (a,)).index(a))
        summary["matched_id"] = matched_id(main, arms)
    for name, ablation in ABLATIONS.items():
        mine = [r for r in records if r["group"] == name]
        if mine and ablation.summarize:
            summary.update(ablation.summarize(mine))
    (out / "results.json").write_text(json.dumps({"summary": summary, "records": records},
                                                 indent=1))
    figures = make_figures(out, folder)
    grad_max = {(r.job.group, r.job.setting, r.job.seed):
                max((h["grad_norm"] for h in r.history), default=None) for r in folder.runs}
    (out / "report.md").write_text(report(summary, records, grad_max))
    return figures


def _finalize_rl(out: Path, folder: Folder) -> list:
    words = world_words(folder.summary["finetune_config"])
    plots.rl_after_finetuning(folder.runs, words, out / "rl_after_finetuning.png")
    runs = [asdict(run) for run in folder.runs]  # the report reads plain data
    (out / "report.md").write_text(rl_report(folder.summary, folder.records, runs))
    return ["rl_after_finetuning.png"]


def make_figures(out: Path, folder: Folder) -> list:
    """(Re)draw every figure of a finalized fine-tuning results folder."""
    summary, records = folder.summary, folder.records
    words = world_words(summary["preset_config"])
    main = [r for r in records if r["group"] == "main"]
    figures = []
    if main:
        arms = list(summary["matched_id"]["arms"])  # finalize's order
        plots.epoch_stability(folder.runs, arms, words, out / "epoch_stability.png")
        figures.append("epoch_stability.png")
        if any(r.get("ood_acc") is not None for r in main):  # a world with OOD sets
            plots.tradeoff(main, arms, summary["matched_id"], words, out / "tradeoff.png")
            figures.append("tradeoff.png")
    own = [name for name, ablation in ABLATIONS.items() if ablation.figure]
    shared = [r for r in records if r["group"] not in ("main", *own)]
    if shared:  # a row of ablations.png each
        plots.ablations(shared, words, out / "ablations.png")
        figures.append("ablations.png")
    for name in own:
        mine = [r for r in records if r["group"] == name]
        if mine:
            runs = [run for run in folder.runs if run.job.group == name]
            figures.append(ABLATIONS[name].figure(mine, summary, out, runs))
    return figures


def _base_scores(records) -> set:
    """The untouched base's ID and OOD scores (every run's epoch 0): one pair for one base."""
    return {(r.get("id_acc"), r.get("ood_acc")) for r in records if r["epoch"] == 0}


def _merged(out: Path, more: Path) -> dict:
    """``out``'s results.json with ``more``'s runs added, or ValueError naming what differs: the
    stage, a setting but the seeds, the base, the runs each seed has, a seed in both."""
    first, second = read_folder(out), read_folder(more)
    if first.stage is not second.stage:
        raise ValueError(f"{more} is not the same stage (fine-tuning or RL) as {out}")
    key = "finetune_config" if first.stage is RLJob else "preset_config"
    a, b = first.summary, second.summary
    differ = differences(a[key], b[key], Preset)
    if first.stage is RLJob:
        differ += [f"rl_config.{k}" for k in differences(a["rl_config"], b["rl_config"], RLPreset)]
    elif (Path(a["base_model"]).name != Path(b["base_model"]).name
          or _base_scores(first.records) != _base_scores(second.records)):
        differ.append("base_model (its name or its untouched scores)")  # pretrained again
    kinds = [{(getattr(run.job, "group", None), run.job.name.rsplit("-s", 1)[0]) for run in f.runs}
             for f in (first, second)]
    if kinds[0] != kinds[1]:
        differ.append("runs (groups, arms or settings)")
    both = set(a[key]["seeds"]) & set(b[key]["seeds"])
    if differ or both:
        raise ValueError(f"{more} cannot add seeds to {out}: "
                         + (f"other {', '.join(differ)}" if differ
                            else f"seeds {sorted(both)} are in both"))
    a[key]["seeds"] = a[key]["seeds"] + b[key]["seeds"]
    for name in ("run_seconds", "sft_small_step_ratio", "best_checkpoints"):
        if name in a:
            a[name] = a[name] | b.get(name, {})
    a["wall_seconds"] += b["wall_seconds"]
    return {"summary": a, "records": first.records + second.records}


def add_seeds(out_dir, more_dir) -> list:
    """Add to the results folder ``out_dir`` the runs of ``more_dir``: the same command at other
    seeds (``reproduce ... --seeds 3 4 --out MORE``), so that a verdict can rest on more seeds.
    Everything but the seeds must agree (an RL folder's ``finetune/`` too) before anything is
    written; then ``out_dir`` is finalized again. An RL folder's ``best_checkpoints`` of the new
    seeds stay where ``more_dir`` has them. Returns the figures' names."""
    out, more = Path(out_dir), Path(more_dir)
    pairs = [(out, more)]
    if (out / "finetune").is_dir() or (more / "finetune").is_dir():
        pairs.append((out / "finetune", more / "finetune"))  # read_folder fails if one lacks it
    merged = [_merged(a, b) for a, b in pairs]  # every check, then every write
    for (a, b), data in zip(pairs, merged):
        for path in (b / "histories").glob("*.jsonl"):
            shutil.copyfile(path, a / "histories" / path.name)
        write_atomic(a / "results.json", json.dumps(data, indent=1))
    if len(pairs) > 1:
        finalize(out / "finetune")
    return finalize(out)
