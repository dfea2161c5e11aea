"""The ablations, in one place: each is one entry of ``ABLATIONS`` (``--ablations refresh eps``),
holding its runs and whatever the results folder, the figures and the claims table need for it;
its runs' records carry its name as ``group`` and the run's label as ``setting``."""
import statistics
from dataclasses import dataclass
from typing import Callable

from . import plots
from ..logprobs import heldout_eval
from ..train import TrainConfig
from .presets import Preset, arm_config
from .records import Folder, Job
from .reports import (arms_of, frontier_points, frontier_summary, matched_id, paired_difference,
                      sign)
from .verdicts import (WINDOW, at_last_epoch, boundary_curves, boundary_effects, fmt, mean_std,
                       paired, sawtooth_claim)
from .worlds import ToyWorld, world_words


@dataclass(frozen=True)
class Ablation:
    """One ablation. ``runs(p)``: ``(arm, setting, TrainConfig overrides)`` of each of its runs,
    every one at each seed of preset ``p``. The rest is optional: ``on_step(lm, world, cfg,
    n_examples)`` makes the ``on_step`` hook of each run (``train``); ``summarize(records)`` what
    ``finalize`` adds to the summary; ``figure(records, summary, out, runs)`` draws its own figure
    and returns the file's name (without one, it is a row of ``ablations.png``); ``claims(folder)``
    gives its rows of the claims table (``claims.py``)."""
    runs: Callable
    on_step: Callable | None = None
    summarize: Callable | None = None
    figure: Callable | None = None
    claims: Callable | None = None


def psft_runs(settings: dict) -> list:
    """PSFT runs, one per setting (label -> TrainConfig overrides)."""
    return [("psft", label, kw) for label, kw in settings.items()]


# ------------------------------------------------------- refresh period, clip, SFT warm-up (PSFT)
def refresh_runs(p: Preset) -> list:
    return psft_runs({f"refresh {k}": dict(batch_size=p.minibatch_size * k) for k in (1, 4, 8, 16)}
                     | {"refresh never": dict(refresh_pi_old=False)})


def eps_runs(p: Preset) -> list:
    return psft_runs({f"eps_high {e}": dict(eps_high=e) for e in (0.14, 0.28, 0.42)}
                     | {"no clip": dict(eps_high=1e9)})


def warmup_runs(p: Preset) -> list:
    steps = p.n_train // p.minibatch_size // 2
    return psft_runs({"no warm-up": {}, f"sft warm-up {steps} steps": dict(sft_warmup_steps=steps)})


def refresh_claims(folder: Folder) -> list:
    never, every8 = (at_last_epoch(folder.records, setting=s)
                     for s in ("refresh never", "refresh 8"))
    diff = paired(never, every8)
    return [{"claim": "4a. refreshing pi_old matters",
             "numbers": f"last-epoch ID: never refreshed {mean_std(never.values())}, refreshed "
                        f"every 8 steps {mean_std(every8.values())}; difference {fmt(diff)}",
             "rule": "reproduced when never refreshing lowers ID (-)",
             "verdict": "reproduced" if diff["sign"] == "-" else "not reproduced"}]


def clip_claims(folder: Folder) -> list:
    grad = {}
    for run in folder.runs:
        grad.setdefault(run.job.setting, []).append(max(h["grad_norm"] for h in run.history))
    clipped = max(max(v) for k, v in grad.items() if k.startswith("eps_high"))
    no_clip, eps = (at_last_epoch(folder.records, setting=s) for s in ("no clip", "eps_high 0.28"))
    return [{"claim": "4b. without the clip, gradient norms are unstable",
             "numbers": f"max gradient norm per run: no clip {mean_std(grad['no clip'])}, with a "
                        f"clip at most {clipped:.1f}; last-epoch ID no clip "
                        f"{mean_std(no_clip.values())} vs eps_high 0.28 {mean_std(eps.values())}",
             "rule": "reproduced when every no-clip run's max gradient norm is over 10x the "
                     "largest with a clip",
             "verdict": "reproduced" if min(grad["no clip"]) > 10 * clipped else "not reproduced"}]


def warmup_claims(folder: Folder) -> list:
    warm = next(s for s in {r["setting"] for r in folder.records} if s.startswith("sft warm-up"))
    id_diff, ood_diff = (paired(at_last_epoch(folder.records, key, setting=warm),
                                at_last_epoch(folder.records, key, setting="no warm-up"))
                         for key in ("id_acc", "ood_acc"))
    verdict = {("+", "-"): "reproduced", ("=", "="): "not reproduced (no measurable effect)"}.get(
        (id_diff["sign"], ood_diff["sign"]), "not reproduced")
    return [{"claim": "4c. an SFT warm-up: a little more ID, a little less OOD",
             "numbers": f"{warm} minus none, last epoch: ID {fmt(id_diff)}, OOD {fmt(ood_diff)}",
             "rule": "reproduced when ID rises (+) and OOD falls (-)",
             "verdict": verdict}]


# ------------------------------------------------------------------------ loss aggregation
# the headline arms under the official run's loss aggregation and lr warm-up, beside the default
# on the same base and seeds
AGGREGATION_VARIANTS = {"token-mean": {}, "seq-mean": dict(loss_aggregation="seq_mean_token_mean"),
                        "warm-up 10 batches": dict(lr_warmup_batches=10)}
AGGREGATION_ARMS = ("psft", "sft", "sft_paper")


def aggregation_runs(p: Preset) -> list:
    return [(arm, f"{arm}, {label}", kw) for label, kw in AGGREGATION_VARIANTS.items()
            for arm in AGGREGATION_ARMS]


def aggregation_summary(records) -> dict:
    """The verdict's comparison within each variant: OOD at matched ID."""
    return {"aggregation_matched_id": {
        label: matched_id([r for r in records if r["setting"].endswith(", " + label)],
                          AGGREGATION_ARMS) for label in AGGREGATION_VARIANTS}}


# ------------------------------------------------------------------------------ the lr frontier
# the controlled arms at 6 lrs, from 3e-5 to 1e-2 (the cpu preset's 1e-4 near the bottom; at 1e-2
# plain SFT no longer learns the task: where a trust region should pay), paper-recipe SFT at 3
# (its 2e-3 in the middle)
FRONTIER_ARMS = ("psft", "sft", "sft_kl")
FRONTIER_LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
FRONTIER_PAPER_LRS = (6e-4, 2e-3, 6e-3)


def frontier_runs(p: Preset) -> list:
    """Each of ``FRONTIER_ARMS`` and the paper-recipe SFT that the preset's arms name."""
    runs = [(arm, lr) for arm in FRONTIER_ARMS if arm in p.arms for lr in FRONTIER_LRS]
    runs += [("sft_paper", lr) for lr in FRONTIER_PAPER_LRS if "sft_paper" in p.arms]
    return [(arm, f"{arm} lr={lr:g}", dict(lr=lr)) for arm, lr in runs]


def frontier_figure(records, summary: dict, out, runs) -> str:
    plots.frontier(frontier_points(records), summary["frontier"], out / "frontier.png")
    return "frontier.png"


# ------------------------------------------------------------------------------------ saw-tooth
# held-out entropy at every step within SAWTOOTH_STEPS steps of an epoch boundary
SAWTOOTH_ARMS, SAWTOOTH_STEPS, SAWTOOTH_ROWS = ("psft", "sft", "sft_paper"), WINDOW, 128


def heldout_near_boundaries(lm, world, cfg: TrainConfig, n_examples: int):
    """``on_step`` for the saw-tooth test: within ``SAWTOOTH_STEPS`` steps of an epoch boundary,
    add the mean token entropy of a fixed held-out set of ID demonstrations (never trained on) to
    the step's record as ``heldout_entropy``."""
    if not isinstance(world, ToyWorld):
        raise ValueError("the sawtooth ablation runs in the toy world")
    held = lm.encode(world.id_rows(SAWTOOTH_ROWS, seed=3))
    per_epoch = -(-n_examples // cfg.minibatch_size)

    def on_step(record):
        position = record["step"] - (record["epoch"] - 1) * per_epoch  # 1 .. per_epoch
        if position <= SAWTOOTH_STEPS or position > per_epoch - SAWTOOTH_STEPS:
            record["heldout_entropy"] = heldout_eval(lm, held)["heldout_entropy"]
    return on_step


def heldout_sawtooth_claims(folder: Folder) -> list:
    curves = {a: boundary_curves(folder.runs, a, "heldout_entropy", "sawtooth")
              for a in SAWTOOTH_ARMS}
    return [sawtooth_claim(
        "3c. the saw-tooth on held-out demonstrations",
        f"entropy of {SAWTOOTH_ROWS} held-out ID demonstrations (never trained on), measured at "
        f"every step within {SAWTOOTH_STEPS} steps of each epoch boundary: the drop across a "
        "boundary minus the mean drop between two consecutive steps beside it (",
        "as 3b, on the held-out set",
        {a: boundary_effects(folder.runs, a, "heldout_entropy", "sawtooth")
         for a in SAWTOOTH_ARMS}, {a: statistics.fmean(c[1]) for a, c in curves.items()})]


def sawtooth_figure(records, summary: dict, out, runs) -> str:
    """Held-out entropy around the epoch boundaries, each arm, titled with what the boundary
    effect says (its sign per arm)."""
    tests = {a: sign(boundary_effects(runs, a, "heldout_entropy", "sawtooth"))
             for a in SAWTOOTH_ARMS}
    curves = {a: boundary_curves(runs, a, "heldout_entropy", "sawtooth")[0]
              for a in SAWTOOTH_ARMS}
    plots.boundary_zoom(curves, tests, out / "sawtooth.png")
    return "sawtooth.png"


# ------------------------------------------------------------------ the trust-region family
# the anchored losses beside PSFT and both SFTs, at the main comparison's settings: one bench
FAMILY_ARMS = ("psft", "sft", "sft_paper", "asft", "sft_kl_vocab")
FAMILY_NEW, FAMILY_AGAINST = ("asft", "sft_kl_vocab"), ("sft", "psft")


def family_frontier_runs(p: Preset) -> list:
    """The anchored arms at the lr frontier's lrs (its other arms: the ``frontier`` ablation)."""
    return [(arm, f"{arm} lr={lr:g}", dict(lr=lr)) for arm in FAMILY_NEW for lr in FRONTIER_LRS]


def family_summary(records) -> dict:
    """OOD at matched ID of every arm, and each arm but PSFT and the SFTs minus SFT (same lr and
    schedule) and minus PSFT, paired by seed: OOD at matched ID, ID and OOD at the last epoch."""
    arms = sorted(arms_of(records), key=lambda a: (*FAMILY_ARMS, a).index(a))
    m = matched_id(records, arms)
    comparisons = {}
    for arm in (a for a in arms if a not in ("psft", "sft", "sft_paper", "sft_small")):
        for other in (a for a in FAMILY_AGAINST if a in arms):
            last = {key: paired(at_last_epoch(records, key, method=arm),
                                at_last_epoch(records, key, method=other))
                    for key in ("id_acc", "ood_acc")}
            comparisons[f"{arm} - {other}"] = {
                "ood_at_matched_id": paired_difference(m, arm, other),
                "last_id": last["id_acc"], "last_ood": last["ood_acc"]}
    return {"family": {"matched_id": m, "comparisons": comparisons}}


def family_figure(records, summary: dict, out, runs) -> str:
    plots.tradeoff(records, FAMILY_ARMS, summary["family"]["matched_id"],
                   world_words(summary["preset_config"]), out / "family.png")
    return "family.png"


# -------------------------------------------------------------------------------- the registry
ABLATIONS = {
    # PSFT with pi_old refreshed every k minibatch steps (k = 1: SFT's schedule, the clip never
    # acts) or never; eps_high at three widths and no clip; plain-SFT steps before PSFT
    "refresh": Ablation(refresh_runs, claims=refresh_claims),
    "eps": Ablation(eps_runs, claims=clip_claims),
    "warmup": Ablation(warmup_runs, claims=warmup_claims),
    "aggregation": Ablation(aggregation_runs, summarize=aggregation_summary),
    "frontier": Ablation(frontier_runs, summarize=lambda rs: {"frontier": frontier_summary(rs)},
                         figure=frontier_figure),
    # ASFT and SFT+KL over the whole vocabulary beside PSFT, SFT and the paper-recipe SFT, each
    # at the main comparison's settings (no overrides: its lr, or the paper recipe's)
    "family": Ablation(lambda p: [(arm, arm, {}) for arm in FAMILY_ARMS],
                       summarize=family_summary, figure=family_figure),
    "family_frontier": Ablation(family_frontier_runs),
    "sawtooth": Ablation(lambda p: [(arm, arm, {}) for arm in SAWTOOTH_ARMS],
                         on_step=heldout_near_boundaries, claims=heldout_sawtooth_claims,
                         figure=sawtooth_figure),
}


def ablation_jobs(p: Preset, name: str) -> list:
    """The jobs of ablation ``name``: each of its runs at every seed (the runner adds the site)."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}: choose from {', '.join(ABLATIONS)}")
    return [Job(arm, s, name, setting, arm_config(p, arm, **kw))
            for arm, setting, kw in ABLATIONS[name].runs(p) for s in p.seeds]
