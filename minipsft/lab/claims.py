"""The paper's claims, checked by code: every number and verdict of the claims table is computed
here from the committed results folders, by the rule written beside it (``python -m minipsft
claims``); comparisons are paired by seed under one sign rule (``verdicts.py``)."""
import json
from pathlib import Path

from . import toy
from .ablations import ABLATIONS
from .family import MEASURES
from .results import read_folder
from .verdicts import (WINDOW, at_last_epoch, boundary_effects, by_seed, fmt, mean_std, paired,
                       sawtooth_claim, two_way)

__all__ = ["base_parameters", "claims", "claims_markdown"]
HEADLINE = ("psft", "sft", "sft_paper")


def _main_claims(path: Path) -> list:
    folder = read_folder(path)
    records = [r for r in folder.records if r["group"] == "main"]
    m = folder.summary["matched_id"]  # the common ID level of claim 2, when each arm got there
    base_format = by_seed(records, "ood_format", 0, method="psft")
    rows = [_id_claim(records, m), _ood_claim(m),
            _last_epoch_claim(records, "ood_format", "2b. format following (IFEval analogue) kept",
                              f"last-epoch ood_format: base {mean_std(base_format.values())}, ",
                              "as claim 2, on the last epoch's format accuracy"),
            _entropy_claim(records),
            sawtooth_claim(
                "3b. SFT's entropy drops at each epoch boundary (saw-tooth)",
                "entropy drop from the last step of an epoch to the first of the next, minus the "
                f"mean drop between two consecutive steps beside it ({WINDOW} steps either side; "
                "training minibatches, ",
                "a saw-tooth when the boundary effect is + (its 95% t interval above zero); "
                "reproduced when SFT has one in both regimes and PSFT none; measured on the "
                "training minibatches (the first of an epoch was trained on in the epoch before), "
                "not on a held-out set", {a: boundary_effects(folder.runs, a) for a in HEADLINE})]
    ct = folder.summary["clipped_tokens"]
    seed = folder.summary["preset_config"]["seeds"][0]  # the run that counted them
    return rows + ([_clipped_claim(ct, seed)] if ct else [])


def _id_claim(records, m: dict) -> dict:
    id_at = {a: at_last_epoch(records, "id_acc", method=a) for a in HEADLINE}
    gap = paired(id_at["psft"], id_at["sft_paper"])

    def epochs(arm):
        return f"{m['arms'][arm]['epoch']} ({m['arms'][arm]['reached']} seeds)"
    return {
        "claim": "1. ID accuracy matches SFT",
        "numbers": f"last epoch ID: PSFT {mean_std(id_at['psft'].values())}, SFT paper recipe "
                   f"{mean_std(id_at['sft_paper'].values())}, SFT at PSFT's lr and schedule "
                   f"{mean_std(id_at['sft'].values())}; first epoch with ID >= {m['level']}: "
                   f"PSFT {epochs('psft')}, SFT paper recipe {epochs('sft_paper')}, SFT "
                   f"{epochs('sft')}",
        "rule": "reproduced when PSFT's last-epoch ID is within 0.05 of the paper-recipe SFT's",
        "verdict": "reproduced" if abs(gap["diff"]) <= 0.05 else "not reproduced"}


def _ood_claim(m: dict) -> dict:
    ood = {a: dict(zip(v["seeds"], v["ood_acc"])) for a, v in m["arms"].items() if v["ood_acc"]}
    paper, control = paired(ood["psft"], ood["sft_paper"]), paired(ood["psft"], ood["sft"])
    return {
        "claim": "2. OOD accuracy beats SFT",
        "numbers": f"OOD at matched ID (first epoch with ID >= {m['level']:.2f}): "
                   + ", ".join(f"{a} {mean_std(v.values())}" for a, v in ood.items())
                   + f"; PSFT minus paper-recipe SFT {fmt(paper)}, minus SFT at PSFT's lr "
                   f"{fmt(control)}",
        "rule": "reproduced when PSFT is higher (+) than both; partly when only than the "
                "paper-recipe SFT (the step size, not the loss); else not reproduced",
        "verdict": two_way(paper, control)}


def _last_epoch_claim(records, key: str, claim: str, numbers: str, rule: str) -> dict:
    """"PSFT is higher" on the last epoch's ``key``, against both SFTs."""
    v = {a: at_last_epoch(records, key, method=a) for a in HEADLINE}
    paper, control = paired(v["psft"], v["sft_paper"]), paired(v["psft"], v["sft"])
    return {"claim": claim,
            "numbers": f"{numbers}PSFT {mean_std(v['psft'].values())}, SFT paper recipe "
                       f"{mean_std(v['sft_paper'].values())}, SFT same lr "
                       f"{mean_std(v['sft'].values())}; PSFT minus paper-recipe SFT "
                       f"{fmt(paper)}, minus SFT {fmt(control)}",
            "rule": rule, "verdict": two_way(paper, control)}


def _entropy_claim(records) -> dict:
    """Claim 3 as stated, "over the epochs": PSFT against both SFTs in every epoch, on the mean
    training-minibatch entropy of the epoch, paired by seed."""
    epochs = sorted({r["epoch"] for r in records if r["train_entropy"] is not None})
    v = {(a, e): by_seed(records, "train_entropy", e, method=a) for a in HEADLINE for e in epochs}
    tests = {(o, e): paired(v["psft", e], v[o, e]) for o in ("sft_paper", "sft") for e in epochs}
    per_epoch = [two_way(tests["sft_paper", e], tests["sft", e]) for e in epochs]
    verdict = per_epoch[0] if len(set(per_epoch)) == 1 else (
        "mixed over the epochs: " + ", ".join(f"epoch {e} {w.split(':')[0]}"
                                               for e, w in zip(epochs, per_epoch)))

    def diffs(other):
        return ", ".join(f"{e} {fmt(tests[other, e])}" for e in epochs)
    last = epochs[-1]
    return {"claim": "3. entropy stays higher than SFT's over the epochs",
            "numbers": f"training-minibatch entropy, last epoch: PSFT "
                       f"{mean_std(v['psft', last].values())}, SFT paper recipe "
                       f"{mean_std(v['sft_paper', last].values())}, SFT same lr "
                       f"{mean_std(v['sft', last].values())}; PSFT minus paper-recipe SFT by "
                       f"epoch: {diffs('sft_paper')}; minus SFT: {diffs('sft')}",
            "rule": "as claim 2, in every epoch (each epoch's mean training-minibatch entropy); "
                    "one verdict when every epoch gives it, else the verdict of each epoch",
            "verdict": verdict}


def _clipped_claim(ct: dict, seed: int) -> dict:
    ratio = ct["clip_rate"]["format"] / ct["clip_rate"]["content"]
    return {
        "claim": "5. clipped tokens are 'thinking-pattern' tokens",
        "numbers": f"format tokens (reflection words, separators, EOS) are "
                   f"{ct['share_of_tokens']['format']:.0%} of demonstration tokens and "
                   f"{ct['share_of_clipped']['format']:.0%} of clipped ones; clip rate "
                   f"{ct['clip_rate']['format']:.2%} vs {ct['clip_rate']['content']:.2%} for "
                   f"content tokens (seed {seed}, all steps)",
        "rule": "reproduced when format tokens are clipped at 2x or more the rate of "
                "content tokens",
        "verdict": "reproduced" if ratio >= 2 else "not reproduced"}


def _ablation_claims(path: Path) -> list:
    """The claims of each ablation (``ablations.ABLATIONS``) that the folder holds runs of."""
    folder = read_folder(path)
    groups = {r["group"] for r in folder.records}
    return [row for name, ablation in ABLATIONS.items() if name in groups and ablation.claims
            for row in ablation.claims(folder)]


def _rl_claims(path: Path) -> list:
    records = json.loads((path / "results.json").read_text())["records"]
    last = max(r["step"] for r in records)
    at = {(start, key): {r["seed"]: r[key] for r in records
                         if r["start"] == start and r["step"] == last}
          for start in HEADLINE for key in ("id_acc", "ood_acc")}
    ms = {k: mean_std(v.values()) for k, v in at.items()}
    diff = {(o, k): paired(at["psft", k], at[o, k]) for o in ("sft_paper", "sft")
            for k in ("id_acc", "ood_acc")}
    verdict = "not reproduced"
    for other, better in (("sft_paper", "partly: vs the paper-recipe SFT only"),
                          ("sft", "reproduced")):
        if diff[other, "id_acc"]["sign"] == "-" or diff[other, "ood_acc"]["sign"] != "+":
            break
        verdict = better
    return [{
        "claim": "6. PSFT is a better start for RL",
        "numbers": f"after {last} GRPO steps: ID PSFT->RL {ms['psft', 'id_acc']}, paper-recipe "
                   f"SFT->RL {ms['sft_paper', 'id_acc']}, same-lr SFT->RL {ms['sft', 'id_acc']}; "
                   f"OOD {ms['psft', 'ood_acc']}, {ms['sft_paper', 'ood_acc']}, "
                   f"{ms['sft', 'ood_acc']}; PSFT->RL minus paper-recipe SFT->RL: ID "
                   f"{fmt(diff['sft_paper', 'id_acc'])}, OOD {fmt(diff['sft_paper', 'ood_acc'])}; "
                   f"minus same-lr SFT->RL: ID {fmt(diff['sft', 'id_acc'])}, OOD "
                   f"{fmt(diff['sft', 'ood_acc'])}",
        "rule": "reproduced when PSFT->RL is not lower in ID (not -) and higher in OOD (+) than "
                "both SFT->RL starts; partly when only than the paper-recipe one",
        "verdict": verdict}]


def _bases_claims(path: Path, claim: str, what: str) -> list:
    """Claim 2 over the folders of an ``across_bases`` summary (``pairs.py``): bases, or (base,
    task) pairs (``what``), per pair and pooled over every (pair, seed)."""
    summary = json.loads(path.read_text())
    bases, comparisons = summary["bases"], summary["comparisons"]
    signs = "; ".join(f"{name}: " + "/".join(d["sign"] if d else "n/a"
                                             for d in c["per_base"].values())
                      + f" ({c['verdict']})" for name, c in comparisons.items())
    pooled = {name: c.get("pooled") for name, c in comparisons.items()}
    spread = "; ".join(f"{a} " + ", ".join(f"{b} {v:.3f}" for b, v in row["per_base"].items())
                       + f" (std across {what} {row['std_across_bases']:.3f})"
                       for a, row in summary["ood_at_matched_id"].items() if a in HEADLINE)
    every, control = "+ on every base", comparisons["psft - sft"]
    wins = sum(d is not None and d["sign"] == "+" for d in control["per_base"].values())
    verdict = ("not reproduced" if comparisons["psft - sft_paper"]["verdict"] != every else
               f"reproduced on every {what[:-1]}" if control["verdict"] == every else
               f"partly: in the paper's recipe on every {what[:-1]}; under the control on {wins} "
               f"of {len(bases)} {what}")
    phrase = {"+": "above", "=": "level with", "-": "below", None: "n/a against"}
    said = {k: phrase[d["sign"] if d else None] for k, d in pooled.items()}
    verdict += (f"; pooled, PSFT is {said['psft - sft_paper']} the paper-recipe SFT and "
                f"{said['psft - sft']} SFT at its lr")
    return [{
        "claim": claim,
        "numbers": f"{what} {', '.join(bases)} (data seeds each: "
                   + ", ".join(str(len(b["matched_id"]["arms"]["psft"]["seeds"]))
                               for b in bases.values())
                   + f"); OOD at matched ID (mean over data seeds) per {what[:-1]}: {spread}; "
                   "matched-ID levels " + ", ".join(f"{b['matched_id']['level']:.2f}"
                                                    for b in bases.values())
                   + f". Signs per {what[:-1]} (n/a: an arm missed the level on a seed): {signs}. "
                   "Pooled over every (" + what[:-1] + ", seed): " + "; ".join(
                       f"{k} {fmt(d)} over {d['seeds']}" for k, d in pooled.items() if d)
                   + f"; over {what[:-1]} means: " + "; ".join(
                       f"{k} {fmt(c['pair_means'])} over {c['pair_means']['seeds']}"
                       for k, c in comparisons.items() if c.get("pair_means")),
        "rule": f"per {what[:-1]} the sign rule on seed-paired differences; reproduced when PSFT "
                f"is higher than both SFTs on every {what[:-1]}; pooled: the sign rule on every "
                f"({what[:-1]}, seed) difference, and on one mean difference per {what[:-1]}",
        "verdict": verdict}]


def _frontier_claims(path: Path) -> list:
    """PSFT's lr frontier against SFT's at the fixed ID levels, per (base, task) pair, pooled."""
    front = json.loads(path.read_text()).get("frontier")
    if not front:
        return []
    signs = {x: d["sign"] if d else None for x, d in front["pooled"].items()}
    verdict = ("n/a" if set(signs.values()) == {None} else "reproduced beyond the step size"
               if "+" in signs.values() and "-" not in signs.values()
               else "not reproduced beyond the step size")
    said = {"+": "above", "=": "level", "-": "below", None: "n/a"}
    return [{
        "claim": "2e. OOD beats SFT at every lr: the frontier, over (base, task) pairs",
        "numbers": f"PSFT's frontier minus {front['other']}'s at ID levels fixed before looking, "
                   "per pair: " + "; ".join(f"{k}: " + ", ".join(f"{x} {fmt(d)}"
                                                              for x, d in gaps.items())
                                           for k, gaps in front["per_pair"].items())
                   + "; pooled over (pair, seed): " + ", ".join(
                       f"{x} {fmt(d)}" for x, d in front["pooled"].items())
                   + "; over the pairs' means: " + ", ".join(
                       f"{x} {fmt(d)}" for x, d in front["pair_means"].items()),
        "rule": "the sign rule on every (pair, seed) frontier gap at each level; reproduced when "
                "PSFT's frontier is above (+) at some level and below (-) at none (the pairs' "
                "means, one per pair, are given beside it and do not enter the verdict)",
        "verdict": f"{verdict} (pooled: " + ", ".join(f"ID {x} {said[g]}"
                                                     for x, g in signs.items()) + "; over pair "
                   "means: " + ", ".join(f"ID {x} {said[d['sign'] if d else None]}"
                                         for x, d in front["pair_means"].items()) + ")"}]


def _family_claims(path: Path) -> list:
    """Beyond the paper: each anchored loss against PSFT, pooled over bases (``family.py``)."""
    summary = json.loads(path.read_text())
    rows = []
    for name, pooled in summary["pooled"].items():
        arm, other = name.split(" - ")
        if other != "psft":
            continue
        parts = {title: pooled[m] for m, title in MEASURES.items()}
        said = {"+": "higher", "-": "lower", "=": "level", None: "n/a"}
        words = "; ".join(f"{k}: {said[d['sign'] if d else None]}" for k, d in parts.items())
        rows.append({
            "claim": f"F. (not the paper's) {arm} against PSFT, same lr and schedule",
            "numbers": f"{arm} minus PSFT, pooled over (base, data seed) pairs on "
                       f"{len(summary['bases'])} bases (toy_cpu_family/family.md): "
                       + "; ".join(f"{k} {fmt(d)} over {d['seeds']} pairs" if d else f"{k} n/a"
                                   for k, d in parts.items()),
            "rule": "the sign rule on every (base, seed) pair",
            "verdict": words})
    return rows


def base_parameters(folder) -> int:
    """Parameters of the toy base model a results folder was fine-tuned from (from its settings;
    the model is built, not loaded)."""
    config = json.loads((Path(folder) / "results.json").read_text())["summary"]["preset_config"]
    return toy.new_model(toy.BaseConfig(**config["base"])).model.num_parameters()


def claims(results_dir="results", main="toy_cpu", ablations="toy_cpu_ablations",
           rl="toy_cpu_rl", bases="toy_cpu_bases", sawtooth="toy_cpu_sawtooth",
           second_size="toy_cpu_wide", family="toy_cpu_family", tasks="toy_cpu_tasks",
           regime="toy_cpu_mild") -> list:
    """Rows ``{"claim", "numbers", "rule", "verdict"}`` from the results folders that exist.
    ``second_size``: the main comparison on a larger base (and ``SECOND_sawtooth``): each claim
    they give also gets their numbers and verdict as ``second``, and ``same_at_both_sizes``;
    ``regime``: the main comparison where forgetting is milder, as ``regime``."""
    root = Path(results_dir)
    pairs = ((main, second_size, _main_claims), (ablations, None, _ablation_claims),
             (rl, None, _rl_claims), (sawtooth, f"{second_size}_sawtooth", _ablation_claims))
    rows = []
    for folder, other, claims_of in pairs:
        if not (root / folder / "results.json").exists():
            continue
        found = claims_of(root / folder)
        if other and (root / other / "results.json").exists():
            size = f"{base_parameters(root / other) / 1e6:.2f}M"
            first = f"{base_parameters(root / folder) / 1e6:.2f}M"
            second = {r["claim"]: r for r in claims_of(root / other)}
            for row in (r for r in found if r["claim"] in second):
                there = second[row["claim"]]
                row["second"] = {"size": size, "first_size": first, "numbers": there["numbers"],
                                 "verdict": there["verdict"]}
                row["same_at_both_sizes"] = there["verdict"] == row["verdict"]
        rows += found
    if (root / regime / "results.json").exists():
        there = {r["claim"]: r for r in _main_claims(root / regime)}
        for row in (r for r in rows if r["claim"] in there):
            row["regime"] = {k: there[row["claim"]][k] for k in ("numbers", "verdict")}
    if (root / bases / "across_bases.json").exists():
        rows += _bases_claims(root / bases / "across_bases.json",
                              "2c. OOD accuracy beats SFT, over independently pretrained bases",
                              "bases")
    if (root / tasks / "across_bases.json").exists():
        rows += _bases_claims(root / tasks / "across_bases.json",
                              "2d. OOD accuracy beats SFT, over (base, in-domain task) pairs",
                              "pairs")
        rows += _frontier_claims(root / tasks / "across_bases.json")
    if (root / family / "family.json").exists():
        rows += _family_claims(root / family / "family.json")
    return sorted(rows, key=lambda r: r["claim"])


def claims_markdown(rows: list) -> str:
    """The claims table; with a second size, its verdict (and whether it is the same) beside the
    first's, and its numbers in a second table below."""
    second = [r["second"] for r in rows if "second" in r]
    head = ("| paper claim | toy world (mean ± std over seeds; differences paired by seed, "
            "[95% t interval]) | rule | verdict |")
    cells = [f"| {r['claim']} | {r['numbers']} | {r['rule']} | **{r['verdict']}** |" for r in rows]
    if not second:
        return "\n".join([head, "|---|---|---|---|", *cells, *_regime_lines(rows)]) + "\n"
    size = second[0]["size"]
    lines = [head.replace("| verdict |", f"| verdict ({second[0]['first_size']}-parameter base) |")
             + f" verdict with the {size}-parameter base | same at both sizes |",
             "|---|---|---|---|---|---|"]
    for r, cell in zip(rows, cells):
        same = "yes" if r.get("same_at_both_sizes") else "no"
        lines.append(cell + (f" **{r['second']['verdict']}** | {same} |" if "second" in r
                             else " not run at this size | - |"))
    lines += ["", f"Numbers with the {size}-parameter base (the same preset otherwise):", "",
              "| paper claim | numbers |", "|---|---|"]
    lines += [f"| {r['claim']} | {r['second']['numbers']} |" for r in rows if "second" in r]
    return "\n".join(lines + _regime_lines(rows)) + "\n"


def _regime_lines(rows: list) -> list:
    """The main claims' verdicts where forgetting is milder, beside the committed regime's."""
    mild = [r for r in rows if "regime" in r]
    if not mild:
        return []
    return ["", "Where forgetting is milder (prior-task demonstrations mixed into the fine-tuning "
            "data, lower lrs: preset `cpu_mild`, `results/toy_cpu_mild/`), the same rules:", "",
            "| paper claim | verdict (committed regime) | verdict (milder regime) | same | numbers "
            "(milder regime) |", "|---|---|---|---|---|",
            *(f"| {r['claim']} | {r['verdict']} | {r['regime']['verdict']} | "
              f"{'yes' if r['verdict'] == r['regime']['verdict'] else 'no'} | "
              f"{r['regime']['numbers']} |" for r in mild)]
