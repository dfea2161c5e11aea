"""Numbers from results files: the matched-ID comparison, the sign rule every verdict uses, the
lr frontier, and the markdown reports (nothing here trains; over bases and tasks: ``pairs.py``)."""
import math
import statistics
from collections import defaultdict

import scipy.stats

from .worlds import world_words


def arms_of(records) -> list:
    """The arms of ``records`` in the order they ran (the preset's arm order)."""
    return list(dict.fromkeys(r["method"] for r in records))


# ------------------------------------------------------------------------------------ frontier
def frontier_points(records, seeds=None) -> dict:
    """arm -> [(mean ID, mean OOD, lr, epoch)] over ``seeds`` (default: all), epochs after 0."""
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


# ID levels at which frontiers are compared, fixed before looking at any frontier (issue 25): no
# maximum over levels, whose selection would bias the gap upwards
FRONTIER_LEVELS = (0.6, 0.7, 0.8, 0.9, 0.95)


def frontier_gaps(records, other: str, level: float) -> list | None:
    """PSFT's frontier minus ``other``'s at ID ``level``, seed by seed (each seed's own frontier
    over every lr and epoch); None where a frontier does not reach the level on every seed."""
    per_seed = [frontier_points(records, [s]) for s in sorted({r["seed"] for r in records})]
    pairs = [(frontier_value(p["psft"], level), frontier_value(p[other], level)) for p in per_seed]
    if any(a is None or b is None for a, b in pairs):
        return None
    return [a - b for a, b in pairs]


def frontier_summary(records, levels=FRONTIER_LEVELS) -> dict:
    """PSFT's frontier minus each other arm's at each fixed ID level: ``sign`` of
    ``frontier_gaps`` (None where they are)."""
    return {other: {f"{x:.2f}": sign(frontier_gaps(records, other, x)) for x in levels}
            for other in arms_of(records) if other != "psft"}


# ------------------------------------------------------------------------------------------ results
def fmt_mean_std(xs, digits=3):
    """``mean ± std`` of the values that are not None; ``-`` when there are none (never nan)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.{digits}f} ± {std:.{digits}f}"


_fmt = fmt_mean_std  # the reports' shorthand


def matched_id(records: list, arms) -> dict:
    """OOD accuracy at the first epoch each arm reaches the highest ID level (rounded down to 0.05)
    every *learning* arm reaches on average (mean ID ever above the base's; others are listed)."""
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
        rows = sorted((x for rs in c.values() for x in rs), key=lambda x: x["epoch"])
        seeds = sorted({x["seed"] for x in rows})
        firsts = (next((x for x in rows if x["seed"] == s and x["epoch"] > 0
                        and x["id_acc"] >= level), None) for s in seeds)
        hits = [h for h in firsts if h]
        out["arms"][a] = {"reached": f"{len(hits)}/{len(seeds)}",
                          "seeds": [h["seed"] for h in hits],  # .get: a world may have no OOD
                          **{k: [h.get(k) for h in hits] for k in ("epoch", "id_acc", "ood_acc")}}
    return out


# ------------------------------------------------------------------------------- the sign rule
RULE = ("a seed-paired difference counts (+ or -) when its 95% t interval (t distribution, n - 1 "
        "degrees of freedom) excludes zero, else =")


def sign(diffs, level: float = 0.95) -> dict | None:
    """The rule every verdict uses (``RULE``): the mean of the seed-paired differences with its
    two-sided t interval; ``+``/``-`` when the interval excludes zero, else ``=`` (always with one
    seed). With 3 seeds the interval is the mean +- 4.30 standard errors. None for None."""
    if diffs is None:
        return None
    diffs = list(diffs)
    n, mean = len(diffs), statistics.fmean(diffs)
    half = math.inf
    if n > 1:
        quantile = float(scipy.stats.t.ppf((1 + level) / 2, n - 1))
        half = quantile * statistics.stdev(diffs) / math.sqrt(n)
    verdict = "+" if mean - half > 0 else "-" if mean + half < 0 else "="
    return {"diff": mean, "lo": mean - half, "hi": mean + half, "seeds": n, "sign": verdict}


def fmt_interval(d: dict | None, missing: str = "n/a") -> str:
    """``+0.016 [-0.009, +0.041] (=)``: the mean difference, its interval, its sign; ``missing``
    where there is none (an arm missed the level)."""
    return missing if not d else f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] ({d['sign']})"


def seed_differences(m: dict, arm: str, other: str) -> list | None:
    """OOD at matched ID of ``arm`` minus ``other``'s, seed by seed; None when either missed the
    level on a seed, or the two ran different seeds."""
    a, b = m["arms"].get(arm), m["arms"].get(other)
    if not (every_seed(a) and every_seed(b)):
        return None
    ood_a, ood_b = (dict(zip(x["seeds"], x["ood_acc"])) for x in (a, b))
    if set(ood_a) != set(ood_b) or None in ood_a.values() or None in ood_b.values():
        return None
    return [ood_a[s] - ood_b[s] for s in sorted(ood_a)]


def paired_difference(m: dict, arm: str, other: str) -> dict | None:
    """``sign`` of ``seed_differences`` (None where they are)."""
    return sign(seed_differences(m, arm, other))


def every_seed(arm: dict | None) -> bool:
    """Whether a matched-ID entry reached the level on every one of its seeds."""
    reached, seeds = arm["reached"].split("/") if arm else ("0", "0")
    return reached == seeds != "0"


def base_seed(config: dict, fallback: str):
    """The pretraining seed of a results folder's base (``preset_config``), else ``fallback``."""
    seed = config.get("pretrain_seed")
    return seed if seed is not None else (config.get("base") or {}).get("pretrain_seed", fallback)


def report(summary: dict, records: list, grad_max: dict | None = None) -> str:
    """Markdown tables of the numbers (mean ± std over seeds), written from the records."""
    words = world_words(summary["preset_config"])
    main = [r for r in records if r["group"] == "main"]
    abl = [r for r in records if r["group"] != "main"]
    lines = [f"# SFT vs PSFT {words.title}: results of preset `{summary['preset']}`", "",
             f"Wall time {summary['wall_seconds'] / 60:.1f} min "
             f"(base model {summary['pretrain_seconds'] / 60:.1f} min, "
             f"{'loaded' if summary['base_loaded_from_cache'] else 'pretrained in this run'}). "
             "Values are mean ± std over seeds.", ""]
    if main:
        lines += _per_epoch_table(main, summary["matched_id"], words)
        if any(r.get("ood_acc") is not None for r in main):  # else no trade-off to report
            lines += ["", *_matched_id_table(summary["matched_id"])]
        if summary["sft_small_step_ratio"]:
            lines += ["", "sft_small lr = lr x (PSFT drift / SFT drift after epoch 1): ratio per "
                      "seed " + ", ".join(f"{k}: {v:.3f}"
                                          for k, v in summary["sft_small_step_ratio"].items())]
    for found, table in ((summary.get("clipped_tokens"), _clipped_tokens_table),
                         (abl, lambda rs: _ablations_table(rs, grad_max or {})),
                         (summary.get("frontier"), _frontier_table),
                         (summary.get("aggregation_matched_id"), _aggregation_table)):
        if found:
            lines += ["", *table(found)]
    return "\n".join(lines) + "\n"


def _section(title: str, intro: str | None, header: str, rows: list) -> list:
    """A report section: the title, the intro (if any), then a table (``header``: ``a | b``)."""
    intro_lines = [intro, ""] if intro else []
    return [f"## {title}", "", *intro_lines, *md_table(header.split(" | "), rows)]


def md_table(header: list, rows) -> list:
    """A markdown table's lines: ``header`` (cells), the rule, then ``rows`` (made by md_row)."""
    return [md_row(header), "|" + "---|" * len(header), *rows]


def md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _per_epoch_table(main: list, matched: dict, words) -> list:
    """Every main arm at every epoch: the world's columns that hold values, entropy, clipfrac."""
    keys = list(words.columns)
    if words.per_set:
        keys += sorted({k for r in main for k in r if k.startswith("ood_")} - set(keys))
    keys = [k for k in keys if any(r.get(k) is not None for r in main)]
    rows = []
    for arm in matched["arms"]:
        for e in range(max(r["epoch"] for r in main) + 1):
            rs = [r for r in main if r["method"] == arm and r["epoch"] == e]
            if rs:
                rows.append(md_row([arm, e] + [_fmt([r.get(k) for r in rs]) for k in keys]
                                   + [_fmt([r[k] for r in rs]) if e else ""
                                      for k in ("train_entropy", "clipfrac")]))
    return _section("Per epoch (main comparison)", None,
                    " | ".join(["arm", "epoch", *keys, "train_entropy", "clipfrac"]), rows)


def _matched_id_table(m: dict) -> list:
    not_learning = (f"; not learning (mean ID never above the base's): "
                    f"{', '.join(m['not_learning'])}" if m.get("not_learning") else "")
    return _section(f"OOD at matched ID (first epoch with id_acc >= {m['level']:.2f})",
                    "The level is the highest that every arm learning the task reaches on "
                    f"average{not_learning}.", "arm | seeds reaching | epoch | id_acc | ood_acc",
                    [md_row([arm, v["reached"], v["epoch"], _fmt(v["id_acc"]), _fmt(v["ood_acc"])])
                     for arm, v in m["arms"].items()])


def _clipped_tokens_table(ct: dict) -> list:
    rows = [md_row([role, ct["seen"][role], f"{ct['share_of_tokens'][role]:.3f}",
                  ct["clipped"].get(role, 0), f"{ct['clip_rate'][role]:.4f}",
                  f"{ct['share_of_clipped'][role]:.3f}"]) for role in ct["seen"]]
    return _section("Which tokens PSFT clips (psft, first seed, all steps)", None,
                    "role | tokens seen | share of tokens | clipped | clip rate | share of clipped",
                    rows) + ["", "Most clipped tokens: "
                             + ", ".join(f"`{t}` {n}" for t, n in ct["top_tokens"])]


def _ablations_table(abl: list, grad_max: dict) -> list:
    """Per ablation setting: the last epoch, each seed's best-ID epoch and largest grad norm."""
    last, rows = max(r["epoch"] for r in abl), []
    for group in dict.fromkeys(r["group"] for r in abl):
        for setting in dict.fromkeys(r["setting"] for r in abl if r["group"] == group):
            rs = [r for r in abl if r["group"] == group and r["setting"] == setting]
            end = [r for r in rs if r["epoch"] == last]
            best = [max((r for r in rs if r["seed"] == s and r["epoch"] > 0),
                        key=lambda r: r["id_acc"])
                    for s in sorted({r["seed"] for r in rs})]
            grads = [grad_max.get((group, setting, r["seed"])) for r in end]
            rows.append(md_row([group, setting] + [_fmt([r[k] for r in end])
                                                   for k in ("id_acc", "ood_acc", "entropy")]
                               + [_fmt([r[k] for r in best]) for k in ("id_acc", "ood_acc")]
                               + [_fmt(grads, 1)]))
    return _section("Ablations (PSFT; at the last epoch and at the best-ID epoch)", None,
                    "ablation | setting | id_acc (last) | ood_acc (last) | entropy (last) "
                    "| best id_acc | ood at best id | max grad norm", rows)


def _frontier_table(frontier: dict) -> list:
    levels = list(next(iter(frontier.values())))
    rows = [md_row([other, *(fmt_interval(g, "not reached") for g in gaps.values())])
            for other, gaps in frontier.items()]
    return _section("The lr frontier: OOD vs ID over every lr and epoch",
                    "Frontier of an arm at ID level x: the best OOD among its (lr, epoch) points "
                    "with ID >= x. Each cell: PSFT's frontier minus the other arm's at a level "
                    "fixed before looking, computed per seed, mean over seeds [95% t interval] "
                    f"(sign); {RULE}; not reached: an arm's frontier misses the level on a seed.",
                    "PSFT minus | " + " | ".join(f"ID {x}" for x in levels), rows)


def _aggregation_table(variants: dict) -> list:
    return _section("Aggregation and warm-up: OOD at matched ID within each variant",
                    "Each variant's level is the highest ID every learning arm reaches in it.",
                    "variant | level | arm | seeds reaching | epoch | id_acc | ood_acc",
                    [md_row([label, f"{m['level']:.2f}", arm, v["reached"], v["epoch"],
                             _fmt(v["id_acc"]), _fmt(v["ood_acc"])])
                     for label, m in variants.items() for arm, v in m["arms"].items()])


def rl_report(summary: dict, records: list, runs: list = ()) -> str:
    """Markdown: the checkpoints RL started from, the rollouts per start, every evaluation."""
    rp = summary["rl_config"]
    starts = list(dict.fromkeys(r["start"] for r in records))  # runs are saved in STARTS order
    words = world_words(summary["finetune_config"])
    lines = [f"# GRPO after fine-tuning {words.title}, preset `{summary['preset']}`", "",
             f"Wall time {summary['wall_seconds'] / 60:.1f} min "
             f"(base model {summary.get('pretrain_seconds', 0) / 60:.1f} min, "
             f"fine-tuning {summary['finetune_seconds'] / 60:.1f} min). "
             f"{rp['steps']} RL steps of {rp['prompts_per_step']} prompts x {rp['group_size']} "
             f"samples, minibatch {rp['minibatch_size']}, lr {rp['lr']}. "
             f"Values are mean ± std over seeds.", ""]
    if summary["best_checkpoints"]:
        lines += _section("Starting checkpoints (best-ID epoch of each fine-tuning run)", None,
                          "run | epoch | id_acc",
                          [f"| {k} | {v['epoch']} | {v['id_acc']:.3f} |"
                           for k, v in summary["best_checkpoints"].items()]) + [""]
    k, rows = max(1, rp["eval_every"]), []
    for start in starts:  # the rollouts: per seed, then mean ± std over seeds
        hs = [r["history"] for r in runs if r["job"]["start"] == start]
        if hs:
            cells = [[statistics.fmean(x["reward"] for x in h[:k]) for h in hs],
                     [statistics.fmean(x["reward"] for x in h[-k:]) for h in hs]]
            cells += [[statistics.fmean(x[key] for x in h) for h in hs]
                      for key in ("zero_adv_groups", "clipfrac_high", "clipfrac_low")]
            rows.append(md_row([start] + [_fmt(c, 4 if i > 2 else 3) for i, c in enumerate(cells)]))
    if runs:
        lines += _section(f"Rollouts (per seed, then mean ± std): reward over the first and last "
                          f"{k} steps, and per step", None, "start | reward first | reward last "
                          "| groups with equal rewards | clipfrac_high | clipfrac_low", rows) + [""]
    keys = ("reward", "id_acc", "ood_acc", "ood_format", "sample_entropy", "rollout_entropy",
            "ood_kl", "entropy")
    keys = [k for k in keys if any(r.get(k) is not None for r in records)]  # the world's metrics
    rows = []
    for start in starts:
        for step in sorted({r["step"] for r in records if r["start"] == start}):
            rs = [r for r in records if r["start"] == start and r["step"] == step]
            rows.append(md_row([start, step] + [_fmt([r.get(k) for r in rs]) for k in keys]))
    return "\n".join(lines + _section("Along RL", None, " | ".join(["start", "step", *keys]),
                                      rows)) + "\n"
