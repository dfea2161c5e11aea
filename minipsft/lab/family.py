"""The trust-region SFT family on one bench: ASFT and SFT+KL over the whole vocabulary beside
PSFT, SFT at PSFT's lr and schedule and the paper-recipe SFT. ``python -m minipsft family`` reads
one ``reproduce --ablations family`` folder per base and, for the lr frontier, the
``--ablations family_frontier`` folder beside the ``frontier`` folder it extends (same preset,
base and seeds: only the arms differ), and writes family.json, family.md and the figures."""
import json
import statistics
from pathlib import Path

from . import plots
from .ablations import FAMILY_AGAINST, FAMILY_ARMS, FAMILY_NEW, family_summary
from .reports import RULE, base_seed, fmt_interval, frontier_points, frontier_summary
from .reports import every_seed, md_row, md_table, paired_difference, sign
from .verdicts import at_last_epoch

MEASURES = {"ood_at_matched_id": "OOD at matched ID", "last_id": "ID, last epoch",
            "last_ood": "OOD, last epoch"}


def _records(folder, group: str) -> list:
    records = json.loads((Path(folder) / "results.json").read_text())["records"]
    mine = [r for r in records if r["group"] == group]
    if not mine:
        raise ValueError(f"{folder} has no {group!r} runs (reproduce --ablations {group})"
                         if group != "main" else f"{folder} has no main comparison")
    return mine


def _config(folder) -> dict:
    """A folder's settings, less those that name its base or only say how it ran."""
    config = json.loads((Path(folder) / "results.json").read_text())["summary"]["preset_config"]
    return {k: v for k, v in config.items()
            if k not in ("pretrain_seed", "base", "workers", "threads", "arms")}


def _same_settings(folders) -> None:
    """Refuse folders made with other settings than the first's (bases and arms may differ)."""
    first = _config(folders[0])
    for folder in folders[1:]:
        other = _config(folder)
        differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differ:
            raise ValueError(f"{folder} and {folders[0]} differ in {', '.join(differ)}: "
                             "compare runs made with the same preset")


def _seed_diffs(records, matched: dict, arm: str, other: str) -> dict:
    """measure -> {seed: arm minus other}; OOD at matched ID only where both reached the level on
    every seed (``paired_difference``'s rule, so that pooled and per-base count the same seeds)."""
    hits = {a: dict(zip(matched["arms"][a]["seeds"], matched["arms"][a]["ood_acc"]))
            for a in (arm, other)}
    out = {"ood_at_matched_id": {} if paired_difference(matched, arm, other) is None else
           {s: hits[arm][s] - hits[other][s] for s in hits[arm]}}
    for measure, key in (("last_id", "id_acc"), ("last_ood", "ood_acc")):
        a, b = (at_last_epoch(records, key, method=x) for x in (arm, other))
        out[measure] = {s: a[s] - b[s] for s in a if s in b}
    return out


def beside(main_folder, extra_folder=None) -> dict:
    """The family's comparisons on a main comparison (``main_folder``: every arm but PSFT and the
    SFTs against SFT and PSFT), with more arms run apart under the same preset and seeds
    (``extra_folder``: ``reproduce`` with ``arms=("asft",)``), their main-group records together."""
    folders = [f for f in (main_folder, extra_folder) if f is not None]
    _same_settings(folders)
    records = [r for f in folders for r in _records(f, "main")]
    return {"folders": [str(f) for f in folders], **family_summary(records)["family"]}


def family(base_folders, frontier_folder=None, family_frontier_folder=None,
           beside_folders=None) -> dict:
    """Per base (a ``family`` folder each): each arm's OOD at matched ID and each anchored arm
    minus SFT and minus PSFT; pooled over every (base, seed) pair; the lr frontier's gaps; and
    (``beside_folders``: [main folder, and a folder of more arms or not], each) ``beside``."""
    bases, pooled = {}, {}
    _same_settings(base_folders)
    for folder in base_folders:
        records = _records(folder, "family")
        summary = json.loads((Path(folder) / "results.json").read_text())["summary"]
        seed = base_seed(summary["preset_config"], Path(folder).name)
        if str(seed) in bases:
            raise ValueError(f"{folder} and {bases[str(seed)]['folder']} have the same base "
                             f"({seed}): give each base once")
        matched = summary["family"]["matched_id"]
        bases[str(seed)] = {"folder": str(folder), "level": matched["level"],
                            "ood_at_matched_id": {a: statistics.fmean(v["ood_acc"])
                                                  for a, v in matched["arms"].items()
                                                  if every_seed(v) and None not in v["ood_acc"]},
                            "comparisons": summary["family"]["comparisons"]}
        for arm in FAMILY_NEW:
            for other in FAMILY_AGAINST:
                for measure, diffs in _seed_diffs(records, matched, arm, other).items():
                    pooled.setdefault(f"{arm} - {other}", {}).setdefault(measure, []).extend(
                        diffs.values())
    out = {"bases": bases,
           "pooled": {name: {m: sign(d) if d else None for m, d in ms.items()}
                      for name, ms in pooled.items()},
           "rule": f"{RULE}; pooled: every (base, data seed) pair is one paired difference"}
    if beside_folders:
        out["beside"] = [beside(*folders) for folders in beside_folders]
    if frontier_folder and family_frontier_folder:
        _same_settings([frontier_folder, family_frontier_folder])
        records = (_records(frontier_folder, "frontier")
                   + _records(family_frontier_folder, "family_frontier"))
        out["frontier"] = frontier_summary(records)
        out["frontier_points"] = frontier_points(records)
    return out


SAID = {"+": "higher", "-": "lower", "=": "not distinguishable from level"}


def verdicts(summary: dict) -> list:
    """One line per comparison, pooled over bases: effect sizes with their intervals first, then
    the words the rule gives them."""
    lines = []
    for name, pooled in summary["pooled"].items():
        reached = sum(c[name]["ood_at_matched_id"] is not None
                      for c in (b["comparisons"] for b in summary["bases"].values()))
        parts = []
        for measure, title in MEASURES.items():
            d = pooled[measure]
            parts.append(f"{title} {fmt_interval(d)}: {SAID[d['sign']]}" if d else
                         f"{title}: n/a (a method missed the matched-ID level on every base)")
        lines.append(f"* **{name}** ({reached} of {len(summary['bases'])} bases at matched ID): "
                     + "; ".join(parts) + ".")
    return lines


def family_markdown(summary: dict) -> str:
    """Markdown of ``family``: numbers first, each difference with its interval, then the sign."""
    bases = list(summary["bases"])
    ood = [[arm, *("n/a" if (v := summary["bases"][b]["ood_at_matched_id"].get(arm)) is None
                   else f"{v:.3f}" for b in bases)] for arm in FAMILY_ARMS]
    lines = ["# The trust-region family on one bench", "",
             "OOD accuracy at matched ID (each base's own level: "
             + ", ".join(f"base {b} {summary['bases'][b]['level']:.2f}" for b in bases)
             + "; n/a: the arm missed it on a seed), mean over data seeds.", "",
             *md_table(["arm", *(f"base {b}" for b in bases)], map(md_row, ood)), "",
             f"Differences, paired by data seed (rule: {summary['rule']}).", "",
             "## Verdicts, pooled over bases", "", *verdicts(summary), ""]
    for measure, title in MEASURES.items():
        rows = [[name, *(fmt_interval(summary["bases"][b]["comparisons"][name].get(measure))
                         for b in bases), fmt_interval(summary["pooled"][name][measure])]
                for name in summary["pooled"]]
        lines += [f"## {title}", "", *md_table(["difference", *(f"base {b}" for b in bases),
                                              "pooled"], map(md_row, rows)), ""]
    if "frontier" in summary:
        levels = list(next(iter(summary["frontier"].values())))
        rows = [[other, *(fmt_interval(g, "not reached") for g in gaps.values())]
                for other, gaps in summary["frontier"].items()]
        lines += ["## The lr frontier (the frontier folder's base)", "",
                  "PSFT's frontier (best OOD at ID >= x over every lr and epoch) minus each arm's, "
                  "per seed, at ID levels fixed before looking.", "",
                  *md_table(["PSFT minus", *(f"ID {x}" for x in levels)], map(md_row, rows)), ""]
    for b in summary.get("beside", []):
        lines += beside_markdown(b)
    return "\n".join(lines)


def beside_markdown(b: dict) -> list:
    """The section of ``beside``: OOD at matched ID per arm, then each comparison's numbers."""
    m = b["matched_id"]
    ood = [[arm, f"{statistics.fmean(v['ood_acc']):.3f}" if every_seed(v) else "n/a"]
           for arm, v in m["arms"].items()]
    rows = [[name, *(fmt_interval(c[k]) for k in MEASURES)]
            for name, c in b["comparisons"].items()]
    more = f" (more arms from {b['folders'][1]})" if len(b["folders"]) > 1 else ""
    return [f"## Beside {b['folders'][0]}{more}", "",
            f"OOD accuracy at matched ID (first epoch with ID >= {m['level']:.2f}), mean over "
            "data seeds; n/a: missed on a seed.", "",
            *md_table(["arm", "OOD"], map(md_row, ood)), "",
            *md_table(["difference", *MEASURES.values()], map(md_row, rows)), ""]


def write_family(out, summary: dict) -> list:
    """family.json, family.md and (with the frontier) family_frontier.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "family.json").write_text(json.dumps(summary, indent=1))
    (out / "family.md").write_text(family_markdown(summary))
    files = ["family.json", "family.md"]
    if "frontier" in summary:
        points = {a: summary["frontier_points"][a] for a in ("psft", "sft", *FAMILY_NEW)}
        plots.frontier(points, summary["frontier"], out / "family_frontier.png", versus="asft")
        files.append("family_frontier.png")
    return files
