"""How the claims table reads results: values by seed, differences paired by seed under the one
sign rule (``reports.sign``), the saw-tooth's boundary effect, and how each is written."""
import statistics

from .reports import fmt_interval as fmt, fmt_mean_std as mean_std, sign


def by_seed(records, key: str, epoch: int, **where) -> dict:
    """seed -> ``key`` of the records at ``epoch`` that match ``where``."""
    return {r["seed"]: r[key] for r in records if r["epoch"] == epoch
            and all(r[k] == v for k, v in where.items())}


def at_last_epoch(records, key: str = "id_acc", **where) -> dict:
    """``by_seed`` at the last epoch of ``records``."""
    return by_seed(records, key, max(r["epoch"] for r in records), **where)


def paired(a: dict, b: dict) -> dict:
    """The sign rule on ``a - b`` over the seeds both have."""
    return sign(a[s] - b[s] for s in sorted(a) if s in b)


def two_way(paper: dict, control: dict) -> str:
    """The verdict of "PSFT is higher" against the paper-recipe SFT and against the control."""
    if paper["sign"] != "+":
        return "not reproduced"
    return ("reproduced" if control["sign"] == "+" else
            "partly: in the paper's recipe, not under the control (same lr and schedule)")


# a boundary is compared with the steps beside it: an epoch's last WINDOW, the next one's first
WINDOW = 4


def around_boundaries(run, key: str, window: int = WINDOW) -> list:
    """Per epoch boundary of a run: ``(before, drops)``, ``key`` at the epoch's last step and, for
    each step o after that one (within ``window`` steps either side), the drop of ``key`` from
    step o - 1 to step o (o = 1: across the boundary); only consecutive steps that measured it."""
    pairs = [(a, b) for a, b in zip(run.history, run.history[1:])
             if key in a and key in b and b["step"] == a["step"] + 1]
    out = []
    for end in (a for a, b in pairs if a["epoch"] != b["epoch"]):
        drops = {b["step"] - end["step"]: a[key] - b[key] for a, b in pairs
                 if 2 - window <= b["step"] - end["step"] <= window
                 and (b["step"] - end["step"] == 1 or a["epoch"] == b["epoch"])}
        out.append((end[key], drops))
    return out


def boundary_curves(runs, arm: str, key: str = "entropy", group: str = "main") -> tuple:
    """``(curves, before)``: per run of ``arm``, step offset o -> the mean over its boundaries of
    the drop into step o minus the mean drop between the steps beside that boundary (at o = 1,
    the boundary effect; a saw-tooth stands out there); ``before``: ``key`` before each boundary."""
    curves, before = [], []
    for run in (r for r in runs if r.job.arm == arm and r.job.group == group):
        by_offset = {}
        for level, drops in around_boundaries(run, key):
            if 1 not in drops or len(drops) < 2:
                continue
            beside = statistics.fmean(d for o, d in drops.items() if o != 1)
            before.append(level)
            for o, d in drops.items():
                by_offset.setdefault(o, []).append(d - beside)
        curves.append({o: statistics.fmean(v) for o, v in sorted(by_offset.items())})
    return curves, before


def boundary_effects(runs, arm: str, key: str = "entropy", group: str = "main") -> list:
    """Per run of ``arm`` (a seed each, the unit the sign rule counts): the mean over its epoch
    boundaries of the drop of ``key`` across a boundary minus the mean drop between two consecutive
    steps beside it (``WINDOW`` steps either side, inside an epoch)."""
    return [curve[1] for curve in boundary_curves(runs, arm, key, group)[0] if curve]


def sawtooth_claim(claim: str, numbers: str, rule: str, effects: dict,
                   sizes: dict | None = None) -> dict:
    """A saw-tooth row of the claims table, from each arm's boundary effects (``psft``, ``sft``,
    ``sft_paper``) under the sign rule; ``numbers`` leads the boundary count. ``sizes``: each
    arm's mean entropy before a boundary, to give each effect as a share of it."""
    tests = {a: sign(v) for a, v in effects.items()}
    signs = {a: t["sign"] for a, t in tests.items()}
    verdict = "not reproduced (no boundary effect in the paper-recipe SFT)"
    if signs["psft"] == "+":
        verdict = "not reproduced (PSFT's entropy drops at the boundaries too)"
    elif signs["sft_paper"] == "+":
        verdict = ("reproduced" if signs["sft"] == "+" else
                   "partly: in the paper-recipe SFT, not in SFT at PSFT's lr and schedule")
    numbers += f"each run's mean over its boundaries, {len(effects['psft'])} seeds): "
    numbers += ", ".join(f"{a} {fmt(t)}" for a, t in tests.items())
    if sizes:
        numbers += "; as a share of the entropy before the boundary: " + ", ".join(
            f"{a} {t['diff'] / sizes[a]:+.1%}" for a, t in tests.items())
    return {"claim": claim, "numbers": numbers, "rule": rule, "verdict": verdict}
