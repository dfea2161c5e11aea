"""How the claims table reads results: values by seed, differences paired by seed under the one
sign rule (``reports.sign``), the saw-tooth's boundary effect, and how each is written."""
import statistics

from .reports import fmt_interval, fmt_mean_std as mean_std, sign


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


fmt = fmt_interval


def two_way(paper: dict, control: dict) -> str:
    """The verdict of "PSFT is higher" against the paper-recipe SFT and against the control."""
    if paper["sign"] != "+":
        return "not reproduced"
    return ("reproduced" if control["sign"] == "+" else
            "partly: in the paper's recipe, not under the control (same lr and schedule)")


def boundary_effects(runs, arm: str, key: str = "entropy", group: str = "main") -> list:
    """Per epoch boundary of each run of ``arm``: the drop of ``key`` across it minus the run's mean
    drop between two steps inside an epoch (only steps that measured ``key``)."""
    effects = []
    for run in runs:
        if run.job.arm != arm or run.job.group != group:
            continue
        pairs = [(a, b) for a, b in zip(run.history, run.history[1:]) if key in a and key in b]
        within = [a[key] - b[key] for a, b in pairs if a["epoch"] == b["epoch"]]
        baseline = statistics.fmean(within)
        effects += [a[key] - b[key] - baseline for a, b in pairs if a["epoch"] != b["epoch"]]
    return effects


def sawtooth_claim(claim: str, numbers: str, rule: str, effects: dict) -> dict:
    """A saw-tooth row of the claims table, from each arm's boundary effects (``psft``, ``sft``,
    ``sft_paper``) under the sign rule; ``numbers`` leads the boundary count."""
    tests = {a: sign(v) for a, v in effects.items()}
    signs = {a: t["sign"] for a, t in tests.items()}
    verdict = "not detectable at this noise"
    if signs["psft"] == "+":
        verdict = "not reproduced (PSFT's entropy drops at the boundaries too)"
    elif signs["sft_paper"] == "+":
        verdict = ("reproduced" if signs["sft"] == "+" else
                   "partly: in the paper-recipe SFT, not in SFT at PSFT's lr and schedule")
    numbers += f"{len(effects['psft'])} boundaries over seeds): "
    numbers += ", ".join(f"{a} {fmt(t)}" for a, t in tests.items())
    return {"claim": claim, "numbers": numbers, "rule": rule, "verdict": verdict}
