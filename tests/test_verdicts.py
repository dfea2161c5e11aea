"""Verdicts computed from results files: the paired sign rule and the verdict over bases."""
import json
import statistics
from pathlib import Path

import pytest

from minipsft.lab.pairs import across_bases, frontiers
from minipsft.lab.reports import paired_difference, sign


def _matched(ood: dict, level=0.8) -> dict:
    return {"level": level, "arms": {a: {"reached": f"{len(v)}/3", "seeds": list(range(len(v))),
                                         "ood_acc": v} for a, v in ood.items()}}


def test_paired_difference_is_the_seed_paired_mean_with_its_t_interval():
    m = _matched({"psft": [0.6, 0.7, 0.8], "sft": [0.5, 0.5, 0.6], "sft_paper": [0.6, 0.7, 0.8]})
    d = paired_difference(m, "psft", "sft")
    assert d["diff"] == pytest.approx(0.5 / 3) and d["seeds"] == 3
    half = 4.302653 * 0.057735 / 3 ** 0.5  # t(0.975, 2) x std of [0.1, 0.2, 0.2] / sqrt(3)
    assert (d["lo"], d["hi"]) == pytest.approx((0.5 / 3 - half, 0.5 / 3 + half), rel=1e-5)
    assert d["sign"] == "+"
    assert paired_difference(m, "psft", "sft_paper")["sign"] == "="
    near = _matched({"psft": [0.6, 0.6, 0.6], "sft": [0.5, 0.6, 0.55]})  # 0.05 < 4.30 x 0.029
    assert paired_difference(near, "psft", "sft")["sign"] == "="
    short = _matched({"psft": [0.6, 0.7, 0.8], "sft": [0.5, 0.5]})  # sft missed a seed
    assert paired_difference(short, "psft", "sft") is None


def test_verdict_over_bases(tmp_path):
    folders = []
    for seed, sft in ((1, [0.5, 0.5, 0.6]), (2, [0.5, 0.55, 0.6]), (3, [0.7, 0.8, 0.9])):
        folder = tmp_path / f"base{seed}"
        folder.mkdir()
        m = _matched({"psft": [0.6, 0.7, 0.8], "sft": sft, "sft_paper": [0.1, 0.15, 0.1]})
        summary = {"preset_config": {"pretrain_seed": seed, "base": {}}, "matched_id": m}
        (folder / "results.json").write_text(json.dumps({"summary": summary, "records": []}))
        folders.append(folder)
    out = across_bases(folders)
    assert out["comparisons"]["psft - sft_paper"]["verdict"] == "+ on every base"
    assert out["comparisons"]["psft - sft"]["verdict"] == "mixed"  # +, +, -
    assert out["ood_at_matched_id"]["sft"]["per_base"]["3"] == pytest.approx(0.8)
    two = across_bases(folders[:2])
    assert two["comparisons"]["psft - sft"]["verdict"] == "+ on every base"
    one = across_bases(folders[2:])  # PSFT below SFT: the verdict carries the sign
    assert one["comparisons"]["psft - sft"]["verdict"] == "- on every base"
    with pytest.raises(ValueError, match="same base"):
        across_bases([folders[0], folders[0]])
    # pooled: the sign rule on every (base, seed) difference, 9 of them
    pooled = out["comparisons"]["psft - sft"]["pooled"]
    diffs = [0.1, 0.2, 0.2, 0.1, 0.15, 0.2, -0.1, -0.1, -0.1]
    assert pooled["seeds"] == 9 and pooled["diff"] == pytest.approx(sum(diffs) / 9)
    assert pooled["sign"] == "=" and out["comparisons"]["psft - sft_paper"]["pooled"]["sign"] == "+"
    # a second task on the same base is another pair, named by its task
    task = tmp_path / "sort1"
    task.mkdir()
    data = json.loads((folders[0] / "results.json").read_text())
    data["summary"]["preset_config"]["id_task"] = "sort_long"
    (task / "results.json").write_text(json.dumps(data))
    assert list(across_bases([folders[0], task])["bases"]) == ["1", "1/sort_long"]


def test_pairs_are_made_by_seed_not_by_position():
    m = _matched({"psft": [0.6, 0.7, 0.8], "sft": [0.8, 0.7, 0.6]})
    m["arms"]["sft"]["seeds"] = [2, 1, 0]  # the same values, listed in another seed order
    assert paired_difference(m, "psft", "sft")["diff"] == pytest.approx(0.0)


def test_the_committed_claims_table_is_what_the_code_computes_from_the_results():
    from pathlib import Path

    from minipsft.lab.claims import claims, claims_markdown

    root = Path(__file__).parents[1] / "results"
    assert (root / "claims.md").read_text() == claims_markdown(claims(root)), \
        "results/claims.md is stale: python -m minipsft claims --out results/claims.md"


def test_sign_rule_known_values():
    from minipsft.lab.reports import sign

    assert sign([0.1, 0.15, 0.2])["sign"] == "+" and sign([-0.1, -0.15, -0.2])["sign"] == "-"
    assert sign([0.1, 0.2, 0.3])["sign"] == "="  # 2 x 4.30 standard errors wide: [-0.05, +0.45]
    assert sign([0.1, -0.1, 0.05])["sign"] == "="
    assert sign([0.4])["sign"] == "="  # one seed: no standard error, nothing counts


def test_the_sawtooth_hook_measures_held_out_entropy_only_near_epoch_boundaries():
    from minipsft.lab import toy
    from minipsft.lab.ablations import SAWTOOTH_STEPS, heldout_near_boundaries
    from minipsft.lab.presets import PRESETS
    from minipsft.train import TrainConfig
    from minipsft.lab.worlds import ToyWorld

    p = PRESETS["smoke"]
    lm = toy.new_model(p.base)
    on_step = heldout_near_boundaries(lm, ToyWorld(p), TrainConfig(minibatch_size=8), 160)
    records = [{"step": s, "epoch": 1 + (s - 1) // 20} for s in range(1, 41)]  # 20 steps/epoch
    for r in records:
        on_step(r)
    measured = [r["step"] for r in records if "heldout_entropy" in r]
    edge = SAWTOOTH_STEPS
    expected = [s for s in range(1, 41) if (s - 1) % 20 < edge or (s - 1) % 20 >= 20 - edge]
    assert measured == expected
    with pytest.raises(ValueError, match="toy world"):
        heldout_near_boundaries(lm, object(), TrainConfig(), 160)


def test_boundary_effect_is_the_boundary_drop_minus_the_drops_beside_it():
    """A drop of 0.5 at the boundary on a steady fall of 0.1 per step is an effect of 0.5 - 0.1;
    the rise at the start of training (entropy climbs while a new style is learned), far from any
    boundary, does not count: it made every boundary look like a drop when the baseline was the
    run's mean drop over all of an epoch's steps."""
    from minipsft.lab.records import Job, Run
    from minipsft.lab.verdicts import boundary_curves, boundary_effects

    def history(boundary_drop):
        h, value = [], 1.0
        for step in range(1, 17):  # 8 steps per epoch
            rise = step <= 4  # the start of epoch 1: entropy rises
            value += 0.3 if rise else -(0.1 + (boundary_drop if step == 9 else 0.0))
            h.append({"step": step, "epoch": 1 + (step - 1) // 8, "h": value})
        return h

    saw = Run(Job("sft", 0, "g", "sft"), [], history(0.4))
    assert boundary_effects([saw], "sft", "h", "g") == pytest.approx([0.4])
    smooth = Run(Job("sft", 0, "g", "sft"), [], history(0.0))
    assert boundary_effects([smooth], "sft", "h", "g") == pytest.approx([0.0])
    curves, before = boundary_curves([saw], "sft", "h", "g")
    assert sorted(curves[0]) == [-2, -1, 0, 1, 2, 3, 4]  # the pairs within 4 steps either side
    assert curves[0] == pytest.approx({o: 0.4 if o == 1 else 0.0 for o in curves[0]})
    assert before == pytest.approx([history(0.4)[7]["h"]])
    # the sign rule counts runs (seeds), not boundaries: one value per run
    two = Run(Job("sft", 1, "g", "sft"), [], history(0.2) + [
        {"step": 17 + k, "epoch": 3, "h": history(0.2)[-1]["h"] - 0.7 - 0.1 * k} for k in range(8)])
    assert boundary_effects([saw, two], "sft", "h", "g") == pytest.approx([0.4, (0.2 + 0.6) / 2])


def test_a_second_size_gives_each_main_claim_its_own_verdict(tmp_path):
    import shutil
    from pathlib import Path

    from minipsft.lab.claims import claims, claims_markdown

    root = Path(__file__).parents[1] / "results"
    shutil.copytree(root / "toy_cpu", tmp_path / "toy_cpu")
    assert not any("second" in r for r in claims(tmp_path))  # no second size: one verdict
    # the same folder again as the "second size": every main claim has a verdict there too,
    # the same one, at the size its settings give (the cpu base: 0.86M parameters)
    shutil.copytree(root / "toy_cpu", tmp_path / "toy_cpu_wide")
    rows = claims(tmp_path)
    assert {r["claim"][:2] for r in rows if "second" in r} == {"1.", "2.", "2b", "3.", "3b", "5."}
    assert all(r["same_at_both_sizes"] and r["second"]["size"] == "0.86M" for r in rows)
    table = claims_markdown(rows)
    assert "verdict with the 0.86M-parameter base | same at both sizes |" in table
    assert table.count("| yes |") == 6
    # the saw-tooth runs at the second size pair with the first size's the same way (claim 3c)
    shutil.copytree(root / "toy_cpu_sawtooth", tmp_path / "toy_cpu_sawtooth")
    shutil.copytree(root / "toy_cpu_sawtooth", tmp_path / "toy_cpu_wide_sawtooth")
    held = next(r for r in claims(tmp_path) if r["claim"].startswith("3c"))
    assert held["same_at_both_sizes"] and held["second"]["numbers"] == held["numbers"]


def test_the_t_rule_needs_more_than_two_standard_errors_at_three_seeds():
    """+0.016 with a standard error of 0.006 is beyond 2 standard errors, but not a sign at 3 seeds
    (t quantile 4.30); at 10 seeds (t quantile 2.26) the same mean and standard error is one."""
    sd3 = 0.006 * 3 ** 0.5
    three = sign([0.016 - sd3, 0.016, 0.016 + sd3])
    assert three["sign"] == "=" and three["lo"] < 0 < three["hi"]
    k = 0.006 * 10 ** 0.5 / (10 / 9) ** 0.5  # ten values 0.016 +- k: standard error 0.006
    ten = sign([0.016 + k] * 5 + [0.016 - k] * 5)
    assert ten["sign"] == "+" and ten["lo"] > 0
    assert sign([-0.05, -0.04, -0.06])["sign"] == "-"


def test_frontier_pooled_and_pair_means():
    """The lr frontier over pairs: pooled over every (pair, seed) gap, and over one mean per pair;
    a level some pair's seeds missed has neither."""
    results = Path(__file__).resolve().parents[1] / "results"
    folders = [results / "toy_cpu_frontier", results / "toy_cpu_tasks/sort_frontier",
               results / "toy_cpu_tasks/frontier_base1236"]
    out = frontiers(folders)
    assert list(out["per_pair"]) == ["1234", "1234/sort_long", "1236"]
    for x, pooled in out["pooled"].items():
        per = [gaps[x] for gaps in out["per_pair"].values()]
        if not all(per):
            assert pooled is None and out["pair_means"][x] is None
            continue
        means = [p["diff"] for p in per]
        assert out["pair_means"][x]["seeds"] == 3
        assert out["pair_means"][x]["diff"] == pytest.approx(statistics.fmean(means))
        assert pooled["seeds"] == sum(p["seeds"] for p in per)
        assert pooled["diff"] == pytest.approx(
            sum(p["diff"] * p["seeds"] for p in per) / pooled["seeds"])
    assert out["pooled"]["0.95"] is None  # base 1236's seeds did not all reach ID 0.95
    with pytest.raises(ValueError, match="second frontier"):
        frontiers(folders[:1] * 2)
