"""Figures of the toy-world results: mean over seeds as a line, min-max over seeds as a band."""
import statistics
import textwrap
from collections import defaultdict

import matplotlib.pyplot as plt  # on a machine without a display matplotlib picks Agg by itself

from ..losses import LOSSES

# one colour and label per registered loss, plus the runner's two SFT controls
COLORS = {name: loss.colour for name, loss in LOSSES.items()} | {
    "sft_paper": "tab:orange", "sft_small": "tab:brown"}
LABELS = {name: loss.label for name, loss in LOSSES.items()} | {
    "sft_paper": "SFT (paper recipe: 1 step/batch, higher lr)",
    "sft_small": "SFT at PSFT's step size"}


def _band(ax, xs, ys_by_seed, color, label, smooth=1, **kw):
    """Mean line and min-max band over seeds (seeds aligned by index)."""
    n = min(len(y) for y in ys_by_seed)
    cols = [[y[i] for y in ys_by_seed] for i in range(n)]
    mean = [statistics.fmean(c) for c in cols]
    lo, hi = [min(c) for c in cols], [max(c) for c in cols]
    if smooth > 1:  # a trailing moving average
        mean, lo, hi = ([statistics.fmean(s[max(0, i - smooth + 1):i + 1]) for i in range(n)]
                        for s in (mean, lo, hi))
    ax.plot(xs[:n], mean, color=color, label=label, **kw)
    if len(ys_by_seed) > 1:
        ax.fill_between(xs[:n], lo, hi, color=color, alpha=0.18, linewidth=0)


def _per_epoch(records, arm, key):
    by_seed = defaultdict(dict)
    for r in records:
        if r["method"] == arm and r.get(key) is not None:
            by_seed[r["seed"]][r["epoch"]] = r[key]
    if not by_seed:
        return [], []
    epochs = sorted(set.intersection(*(set(d) for d in by_seed.values())))
    return epochs, [[d[e] for e in epochs] for d in by_seed.values()]


def _grid(n: int):
    """A figure of ``n`` panels, three to a row."""
    nrows = -(-n // 3)
    fig, axes = plt.subplots(nrows, 3, figsize=(16, 4.25 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.remove()
    return fig, axes


def _axis(ax, key: str, title: str, xlabel: str) -> None:
    """A metric's panel: its title and labels, accuracies on a 0-1 axis."""
    nats = ("mean entropy (nats)" if "entropy" in key else
            "nats per token" if key in ("ood_kl", "heldout_nll") else None)
    ax.set(title=title, xlabel=xlabel, ylabel=nats or "accuracy")
    if not nats:
        ax.set_ylim(-0.02, 1.02)


def _save(fig, path, dpi: int, rect=None) -> None:
    """Save and close; with no ``path`` the figure stays open (a notebook shows it)."""
    fig.tight_layout(rect=rect)
    if path is not None:
        fig.savefig(path, dpi=dpi)
        plt.close(fig)


def _finish_grid(fig, axes, ncol: int, title: str, path) -> None:
    """Grid lines, one shared legend below the panels, the title; save and close."""
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
    fig.suptitle(title)
    _save(fig, path, 110, rect=(0, 0.05, 1, 0.96))


def panels(records, words) -> list:
    """(key, title) of every metric of ``words`` that ``records`` hold, then one per OOD set."""
    have = {k for r in records for k, v in r.items() if v is not None}
    out = [(k, title) for k, title in words.metrics.items() if k in have]
    if words.per_set:
        sets = sorted(k for k in have if k.startswith("ood_") and k not in words.metrics)
        out += [(k, f"Out-of-domain: {k[4:]}") for k in sets]
    return out


def epoch_stability(runs, arms, words, path, title: str | None = None):
    """Training entropy per step, then each of the world's metrics with data per epoch; ``title``
    (a finding) replaces the neutral one."""
    main = [r for r in runs if r.job.group == "main"]
    records = [x for r in main for x in r.records]
    arms = [a for a in arms if any(r.job.arm == a for r in main)]
    shown = panels(records, words)
    fig, axes = _grid(len(shown) + 1)
    ax = axes.flat[0]
    for arm in arms:
        hs = [r.history for r in main if r.job.arm == arm]
        xs = [h["epoch_frac"] for h in hs[0]]
        _band(ax, xs, [[h["entropy"] for h in hist] for hist in hs], COLORS[arm], LABELS[arm],
              smooth=max(1, len(xs) // 100))
    ax.set(title="Token entropy of the training minibatches", xlabel="epoch",
           ylabel="mean entropy (nats)")
    for ax, (key, title) in zip(axes.flat[1:], shown):
        for arm in arms:
            epochs, ys = _per_epoch(records, arm, key)
            if epochs:
                _band(ax, epochs, ys, COLORS[arm], LABELS[arm], marker="o", markersize=3)
        _axis(ax, key, title, "epoch")
    seeds = len({r.job.seed for r in main})
    _finish_grid(fig, axes, len(arms), title or f"SFT vs PSFT across epochs {words.title} (mean "
                 f"over {seeds} seed(s), band = min-max)", path)


def tradeoff(records, arms, matched, words, path, title: str | None = None):
    """Left: OOD against ID along training (a thin line per seed, a thick one for the mean). Right:
    OOD at the common ID level (``matched``), a bar per arm; the title says each arm's, or
    ``title`` (a finding)."""
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 6), width_ratios=(1.35, 1))
    for arm in arms:
        epochs, ys_id = _per_epoch(records, arm, "id_acc")
        if not epochs:
            continue
        _, ys_ood = _per_epoch(records, arm, "ood_acc")
        for a, b in zip(ys_id, ys_ood):
            ax.plot(a, b, color=COLORS[arm], alpha=0.25, linewidth=0.8)
        mid = [statistics.fmean(c) for c in zip(*ys_id)]
        mood = [statistics.fmean(c) for c in zip(*ys_ood)]
        ax.plot(mid, mood, color=COLORS[arm], marker="o", markersize=4, label=LABELS[arm],
                linewidth=2)
        ax.annotate(str(epochs[-1]), (mid[-1], mood[-1]), fontsize=8, color=COLORS[arm])
    level = matched["level"]
    ax.axvline(level, color="gray", linestyle="--", linewidth=1,
               label=f"common ID level {level:.2f}")
    ax.set(title="OOD vs ID along training (epoch 0 = base model; numbers = last epoch)",
           xlabel=f"in-domain accuracy ({words.id_name})",
           ylabel=f"out-of-domain accuracy ({words.ood_name})",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    reached = [(a, v["ood_acc"]) for a, v in matched["arms"].items() if v["ood_acc"]]
    for k, (arm, ood) in enumerate(reached):
        std = statistics.stdev(ood) if len(ood) > 1 else 0.0
        bars.bar(k, statistics.fmean(ood), yerr=std, color=COLORS[arm], alpha=0.8, capsize=4)
        bars.scatter([k] * len(ood), ood, color="black", s=10, zorder=3)
    missed = [a for a, v in matched["arms"].items() if not v["ood_acc"]]
    bars.set_xticks(range(len(reached)), [a for a, _ in reached], rotation=20)
    never = f"; never reached: {', '.join(missed)}" if missed else ""
    bars.set(title=f"OOD at the first epoch with ID >= {level:.2f}\n(bar: mean, line: std, "
                   f"dots: seeds{never})",
             ylabel="out-of-domain accuracy", ylim=(0, 1.02))
    bars.grid(alpha=0.3, axis="y")
    finding = ", ".join(f"{a} {statistics.fmean(ood):.2f}" for a, ood in
                        sorted(reached, key=lambda x: -statistics.fmean(x[1])))
    fig.suptitle(title or f"Forgetting for the same skill {words.title}: OOD at ID >= "
                 f"{level:.2f}: {finding}", fontsize=11)
    _save(fig, path, 110)


def ablations(records, words, path):
    """Per ablation: ID and OOD accuracy per epoch for each setting."""
    groups = list(dict.fromkeys(r["group"] for r in records if r["group"] != "main"))
    fig, axes = plt.subplots(len(groups), 3, figsize=(16, 4.2 * len(groups)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, group in zip(axes, groups):
        settings = list(dict.fromkeys(r["setting"] for r in records if r["group"] == group))
        for i, setting in enumerate(settings):
            rs = [dict(r, method=setting) for r in records
                  if r["group"] == group and r["setting"] == setting]
            color = cmap(i / max(1, len(settings) - 1) * 0.9)
            for ax, key in zip(row, ("id_acc", "ood_acc", "entropy")):
                epochs, ys = _per_epoch(rs, setting, key)
                _band(ax, epochs, ys, color, setting, marker="o", markersize=3)
        for ax, (key, title) in zip(row, (("id_acc", "ID accuracy"), ("ood_acc", "OOD accuracy"),
                                          ("entropy", "held-out demonstration entropy"))):
            ax.set(title=f"{group}: {title}", xlabel="epoch", ylabel=key)
            if key != "entropy":
                ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle(f"PSFT ablations {words.title} (mean over seeds, band = min-max)")
    _save(fig, path, 100, rect=(0, 0, 1, 0.97))


def frontier_finding(gaps: dict, versus: str = "SFT") -> str:
    """The figure's title: at which fixed ID levels PSFT's frontier is above, level with or below
    ``versus``'s (``reports.frontier_summary``)."""
    said = {"+": "above", "=": "level with", "-": "below"}
    groups = {w: [x for x, g in gaps.items() if g and g["sign"] == k] for k, w in said.items()}
    parts = [f"{w} {versus}'s at ID {', '.join(xs)}" for w, xs in groups.items() if xs]
    return "PSFT's frontier is " + "; ".join(parts or [f"not comparable with {versus}'s"]) + \
        " (seed-paired, 95% t intervals)"


def frontier(points: dict, gaps: dict, path, versus: str = "sft"):
    """Every (arm, lr, epoch) point and each arm's frontier; the title says PSFT's gap to
    ``versus``'s (an arm)."""
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    levels = [0.5 + 0.005 * i for i in range(100)]
    for arm, pts in points.items():
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.45, color=COLORS[arm])
        curve = [(x, max((p[1] for p in pts if p[0] >= x), default=None)) for x in levels]
        curve = [(x, y) for x, y in curve if y is not None]
        ax.step([x for x, _ in curve], [y for _, y in curve], where="post", color=COLORS[arm],
                linewidth=2, label=f"{LABELS[arm]} ({len(pts)} lr x epoch points)")
    finding = frontier_finding(gaps.get(versus) or {}, "SFT" if versus == "sft" else
                               LABELS[versus])
    ax.set(title=textwrap.fill(finding, 95) + "\nfrontier = best OOD at ID >= x, over every lr "
           "and epoch",
           xlabel="in-domain accuracy", ylabel="out-of-domain accuracy", xlim=(0.45, 1.0))
    ax.title.set_fontsize(10)  # the finding is a long line
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    _save(fig, path, 100)


SHORT = {"psft": "PSFT", "sft": "SFT at PSFT's lr", "sft_paper": "the paper-recipe SFT"}


def boundary_finding(tests: dict) -> str:
    """The saw-tooth figure's title: whose entropy drops more across an epoch boundary than
    beside it (``tests``: arm -> ``reports.sign`` of its boundary effects)."""
    said = lambda arms: ", ".join(  # noqa: E731
        f"{SHORT.get(a, a)} ({tests[a]['diff']:+.3f} nats)" for a in arms)
    drop = [a for a, t in tests.items() if t["sign"] == "+"]
    rest = [a for a, t in tests.items() if t["sign"] != "+"]
    parts = ([f"measurable for {said(drop)}"] if drop else []) + (
        [f"none for {said(rest)}"] if rest else [])
    return ("Held-out entropy's drop across an epoch boundary beyond the drops beside it: "
            + "; ".join(parts) + " (95% t intervals over seeds)")


def boundary_zoom(curves: dict, tests: dict, path):
    """The saw-tooth up close: per arm (``curves``: arm -> per seed, step offset from an epoch's
    last step -> the entropy drop into that step less the mean drop beside the boundary,
    ``verdicts.boundary_curves``), the mean over seeds and the min-max band; the title says what
    ``tests`` (arm -> the sign rule on its boundary effects) found."""
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for arm, by_seed in ((a, c) for a, c in curves.items() if c):
        offsets = sorted(set.intersection(*(set(c) for c in by_seed)))
        _band(ax, offsets, [[c[o] for o in offsets] for c in by_seed], COLORS[arm], LABELS[arm],
              marker="o")
    ax.axvline(1, linestyle="--", color="gray", linewidth=1)
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.set(title=textwrap.fill(boundary_finding(tests), 90),
           xlabel="step o after an epoch's last step (o = 1: the first step of the next epoch)",
           ylabel="entropy drop from step o - 1 to o,\nless the mean drop beside the boundary "
                  "(nats)")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, 100)


def pairs(summary: dict, path, names=("psft - sft_paper", "psft - sft")):
    """PSFT's seed-paired OOD difference at matched ID from each SFT, per (base, task) pair and
    pooled over (pair, seed), with 95% t intervals (``pairs.across_bases``); the title says the
    pooled finding."""
    fig, ax = plt.subplots(figsize=(8.5, 0.5 * len(summary["bases"]) + 3))
    labels = [*summary["bases"], "pooled"]
    for k, name in enumerate(names):
        c = summary["comparisons"][name]
        rows = [*c["per_base"].values(), c.get("pooled")]
        ys = [y + 0.2 * k for y in range(len(labels))]
        kept = [(y, d) for y, d in zip(ys, rows) if d]
        other = name.split(" - ")[1]
        ax.errorbar([d["diff"] for _, d in kept], [y for y, _ in kept], fmt="o",
                    xerr=[[d["diff"] - d["lo"] for _, d in kept],
                          [d["hi"] - d["diff"] for _, d in kept]],
                    color=COLORS[other], capsize=3, label=f"PSFT minus {LABELS[other]}")
    ax.axvline(0, color="gray", linewidth=1)
    ax.set_yticks(range(len(labels)), [f"base {b}" for b in summary["bases"]] + ["pooled"])
    ax.invert_yaxis()
    said = {"+": "above", "=": "level with", "-": "below", None: "not comparable with"}
    pooled = {n: summary["comparisons"][n].get("pooled") for n in names}
    finding = "; ".join(f"{said[d['sign'] if d else None]} {LABELS[n.split(' - ')[1]]}"
                        for n, d in pooled.items())
    ax.set(title=textwrap.fill(f"PSFT's OOD at matched ID, pooled over {len(summary['bases'])} "
                               f"(base, task) pairs: {finding}", 90),
           xlabel="OOD accuracy difference at matched ID (95% t interval)")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    _save(fig, path, 100)


START_COLORS = {"base": "tab:gray", "sft_paper": "tab:orange", "sft": "tab:red", "psft": "tab:blue"}
START_LABELS = {"base": "base model", "sft_paper": "SFT (paper recipe) -> RL",
                "sft": "SFT (PSFT's lr) -> RL", "psft": "PSFT -> RL"}


def rl_after_finetuning(runs, words, path):
    """Rollout reward and sample entropy per RL step, then the world's metrics per evaluation."""
    starts = [s for s in START_COLORS if any(r.job.start == s for r in runs)]
    records = [e for r in runs for e in r.records]
    shown = [(k, t) for k, t in panels(records, words) if k != "ood_kl"]
    fig, axes = _grid(len(shown) + 2)
    for ax, key, title, ylabel in (
            (axes.flat[0], "reward", "Reward of the rollouts (share correct)", "reward"),
            (axes.flat[1], "entropy", "Token entropy of the sampled completions",
             "mean entropy (nats)")):
        for s in starts:
            hs = [r.history for r in runs if r.job.start == s]
            _band(ax, [h["step"] for h in hs[0]], [[h[key] for h in hist] for hist in hs],
                  START_COLORS[s], START_LABELS[s], smooth=max(1, len(hs[0]) // 12))
        ax.set(title=title, xlabel="RL step", ylabel=ylabel)
    for ax, (key, title) in zip(axes.flat[2:], shown):
        for s in starts:
            evs = [r.records for r in runs if r.job.start == s]
            _band(ax, [e["step"] for e in evs[0]], [[e[key] for e in ev] for ev in evs],
                  START_COLORS[s], START_LABELS[s], marker="o", markersize=3)
        _axis(ax, key, title, "RL step")
    seeds = len({r.job.seed for r in runs})
    _finish_grid(fig, axes, len(starts), f"GRPO after fine-tuning {words.title} (mean over "
                 f"{seeds} seed(s), band = min-max)", path)
