"""The main comparison over (base, task) pairs: one ``reproduce`` folder per pair (a base
pretrained with its own seed, ``--set pretrain_seed=N``; a toy in-domain task, ``--set
id_task=...``). Per pair, OOD at matched ID and PSFT's seed-paired differences from the SFTs under
the sign rule; over pairs, the pooled difference over every (pair, seed) with its t interval."""
import json
import statistics
from pathlib import Path

from .reports import (FRONTIER_LEVELS, RULE, base_seed, every_seed, fmt_interval, frontier_gaps,
                      md_row, md_table, seed_differences, sign)
from .toy import ID_TASK
from .verdicts import at_last_epoch

__all__ = ["COMPARISONS", "LAST_EPOCH", "across_bases", "across_bases_report", "frontiers"]

# PSFT against each SFT: at matched ID (OOD), and at the last epoch (these measures)
COMPARISONS = (("psft", "sft_paper"), ("psft", "sft"), ("psft", "sft_small"))
LAST_EPOCH = {"id_acc": "ID", "ood_acc": "OOD", "ood_format": "format", "entropy":
              "held-out entropy"}


def _pair(folder, group: str = "main") -> tuple:
    """``(label, summary, records of group)`` of a folder: its base seed, and its task unless the
    first."""
    data = json.loads((Path(folder) / "results.json").read_text())
    config = data["summary"]["preset_config"]
    task = config.get("id_task", ID_TASK)
    seed = base_seed(config, Path(folder).name)
    label = str(seed) if task == ID_TASK else f"{seed}/{task}"
    return label, data["summary"], [r for r in data["records"] if r["group"] == group]


def _last_epoch(pairs: dict, arm: str, other: str) -> dict:
    """Per measure, ``arm`` minus ``other`` at the last epoch, pooled over (pair, seed)."""
    out = {}
    for key in LAST_EPOCH:
        diffs = []
        for _, records in pairs.values():
            if not any(r["method"] == other for r in records):
                continue
            a = at_last_epoch(records, key, method=arm)
            b = at_last_epoch(records, key, method=other)
            diffs += [a[s] - b[s] for s in sorted(a) if s in b and None not in (a[s], b[s])]
        out[key] = sign(diffs) if len(diffs) > 1 else None
    return out


def frontiers(folders, other: str = "sft") -> dict:
    """PSFT's lr frontier minus ``other``'s at each fixed ID level, per (base, task) pair (a
    ``--ablations frontier`` folder each) and pooled over every (pair, seed)."""
    per_pair, pooled = {}, {}
    for folder in folders:
        label, _, records = _pair(folder, "frontier")
        if label in per_pair:
            raise ValueError(f"{folder}: a second frontier of pair {label}: give each pair once")
        both = {"psft", other} <= {r["method"] for r in records}
        per_pair[label] = {}
        for level in FRONTIER_LEVELS:
            diffs = frontier_gaps(records, other, level) if both else None
            per_pair[label][f"{level:.2f}"] = sign(diffs)
            pooled.setdefault(f"{level:.2f}", []).append(diffs)
    every = {x: ds for x, ds in pooled.items() if all(ds)}  # levels every pair's seeds reached
    return {"other": other, "per_pair": per_pair,
            "pooled": {x: sign(v for d in every[x] for v in d) if x in every else None
                       for x in pooled},
            # one mean per pair, as for ``pair_means`` of the comparisons
            "pair_means": {x: sign(statistics.fmean(d) for d in every[x])
                           if x in every and len(every[x]) > 1 else None for x in pooled}}


def across_bases(folders, frontier_folders=()) -> dict:
    """OOD at matched ID per (base, task) pair (a folder each) and arm, its spread across pairs,
    and each of ``COMPARISONS`` per pair, with a verdict over pairs and the pooled difference;
    with ``frontier_folders``, the lr frontier's gaps per pair and pooled (``frontiers``)."""
    pairs, bases = {}, {}
    for folder in folders:
        label, summary, records = _pair(folder)
        if label in bases:
            raise ValueError(f"{folder} and {bases[label]['folder']} have the same base and task "
                             f"({label}): give each base once")
        bases[label] = {"folder": str(folder), "matched_id": summary["matched_id"]}
        pairs[label] = (summary, records)
    table = {}
    for arm in dict.fromkeys(a for b in bases.values() for a in b["matched_id"]["arms"]):
        hits = {name: b["matched_id"]["arms"].get(arm) for name, b in bases.items()}
        # an arm that missed the level on a seed: no mean
        per_base = {k: statistics.fmean(h["ood_acc"]) for k, h in hits.items() if every_seed(h)}
        if per_base:
            means = list(per_base.values())
            table[arm] = {"per_base": per_base, "mean": statistics.fmean(means),
                          "std_across_bases": statistics.stdev(means) if len(means) > 1 else 0.0}
    comparisons = {}
    for arm, other in COMPARISONS:
        diffs = {k: seed_differences(b["matched_id"], arm, other) for k, b in bases.items()}
        per_base = {k: sign(d) for k, d in diffs.items()}
        signs = {d["sign"] if d else None for d in per_base.values()}
        one = len(signs) == 1 and None not in signs  # the same sign on every base
        kept = [d for d in diffs.values() if d]  # pairs where both arms reached the level
        pooled = [x for d in kept for x in d]
        comparisons[f"{arm} - {other}"] = {
            "per_base": per_base, "verdict": f"{signs.pop()} on every base" if one else "mixed",
            "pooled": sign(pooled) if len(pooled) > 1 else None, "pairs": len(kept),
            # the unit a base or task varies by: one mean per pair (does not treat seeds of one
            # pair as independent draws of the pair)
            "pair_means": sign(statistics.fmean(d) for d in kept) if len(kept) > 1 else None,
            "last_epoch": _last_epoch(pairs, arm, other)}
    return {"bases": bases, "ood_at_matched_id": table, "comparisons": comparisons,
            **({"frontier": frontiers(frontier_folders)} if frontier_folders else {}),
            "rule": f"per base, OOD at matched ID: {RULE}; over bases: the sign when every base "
                    "gives the same one, else mixed; pooled: the rule on every (base, seed) "
                    "difference of the bases where both arms reached the level on every seed; "
                    "over base means: the rule on one mean difference per base"}


def across_bases_report(summary: dict) -> str:
    """Markdown of ``across_bases``."""
    bases = [f"base {b}" for b in summary["bases"]]
    means = [md_row([arm, *(f"{row['per_base'][b]:.3f}" if b in row["per_base"] else "n/a"
                            for b in summary["bases"]),
                     f"{row['mean']:.3f}", f"{row['std_across_bases']:.3f}"])
             for arm, row in summary["ood_at_matched_id"].items()]
    diffs = [md_row([name, *(fmt_interval(d) for d in c["per_base"].values()), c["verdict"],
                     fmt_interval(c.get("pooled")), fmt_interval(c.get("pair_means"))])
             for name, c in summary["comparisons"].items()]
    last = [md_row([name, *(fmt_interval((c.get("last_epoch") or {}).get(k)) for k in LAST_EPOCH)])
            for name, c in summary["comparisons"].items()]
    return "\n".join([
        "# The main comparison on independently pretrained bases (and tasks)", "",
        "OOD accuracy at matched ID (each base's own level), mean over data seeds; bases named by "
        "their pretraining seed (and the in-domain task when it is not the reversals); n/a: the "
        "arm missed the level on a seed. Mean and std across the bases where it is given.", "",
        *md_table(["arm", *bases, "mean", "std across bases"], means), "",
        "Levels: " + ", ".join(f"{b} {v['matched_id']['level']:.2f}"
                               for b, v in zip(bases, summary["bases"].values())),
        "", f"Rule: {summary['rule']}.", "",
        *md_table(["difference", *bases, "verdict", "pooled over (base, seed)",
                   "over base means"], diffs), "",
        "At the last epoch, pooled over every (base, seed) pair:", "",
        *md_table(["difference", *LAST_EPOCH.values()], last), *_frontier_lines(summary)]) + "\n"


def _frontier_lines(summary: dict) -> list:
    front = summary.get("frontier")
    if not front:
        return []
    levels = list(front["pooled"])
    pairs = {f"base {k}": v for k, v in front["per_pair"].items()} | {
        "pooled over (pair, seed)": front["pooled"], "over pair means": front["pair_means"]}
    rows = [md_row([k, *(fmt_interval(g, "not reached") for g in gaps.values())])
            for k, gaps in pairs.items()]
    return ["", f"The lr frontier: PSFT's minus {front['other']}'s (best OOD among every lr and "
            "epoch's points with ID >= the level, per seed), per pair, pooled, and over the pairs' "
            "means:", "",
            *md_table(["pair", *(f"ID {x}" for x in levels)], rows)]
