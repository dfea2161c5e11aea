"""Statements about the committed results that code can check."""
import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_the_shipped_base_reproduces_the_committed_cpu_records():
    """results/toy_cpu_aggregation was run from the shipped base; its token-mean rows are the same
    arms, seeds and settings as results/toy_cpu's main comparison, so equal records mean the same
    base (results/README.md, minipsft/bases/README.md)."""
    def key(r):
        return r["method"], r["seed"], r["epoch"]

    committed = {key(r): r for r in json.loads((RESULTS / "toy_cpu" / "results.json").read_text())
                 ["records"] if r["group"] == "main"}
    rerun = [r for r in json.loads((RESULTS / "toy_cpu_aggregation" / "results.json").read_text())
             ["records"] if r["setting"].endswith(", token-mean")]
    assert len(rerun) == 63
    for r in rerun:
        for metric in ("id_acc", "ood_acc", "ood_format", "entropy"):
            assert r[metric] == committed[key(r)][metric], (key(r), metric)


FOLDERS = sorted(str(p.parent.relative_to(RESULTS)) for p in RESULTS.rglob("results.json"))


@pytest.mark.parametrize("folder", FOLDERS)
def test_finalize_rebuilds_every_committed_folder_byte_for_byte(folder, tmp_path):
    """The results files on disk are the contract: ``finalize`` (either stage) reads a committed
    folder back through the typed records and writes its report.md and results.json unchanged."""
    import shutil

    from minipsft.lab.results import finalize

    copy = tmp_path / "folder"
    shutil.copytree(RESULTS / folder, copy, ignore=shutil.ignore_patterns("finetune"))
    figures = finalize(copy)
    assert sorted(figures) == sorted(p.name for p in (RESULTS / folder).glob("*.png"))
    for name in ("report.md", "results.json"):
        assert (copy / name).read_bytes() == (RESULTS / folder / name).read_bytes(), name


@pytest.mark.parametrize("base, main", [("1234", "toy_cpu"), ("1235", "toy_cpu_base1235"),
                                        ("1236", "toy_cpu_base1236")])
def test_the_family_bench_reran_the_committed_main_comparison(base, main):
    """PSFT, SFT and the paper-recipe SFT in results/toy_cpu_family/ are the committed main
    comparison's runs again (same base, data, order and settings). On bases 1234 and 1235 every
    accuracy is equal, and the training-side numbers to float32 rounding (the entropy is now summed
    as -sum p log p). On base 1236, whose committed run pretrained its base in the run itself, one
    run drifted: PSFT seed 1 differs from epoch 4 on (ID, OOD, format by at most 0.011, two records
    each; entropy by up to 8e-4); the other 61 accuracy records are equal."""
    def key(r):
        return r["method"], r["seed"], r["epoch"]

    committed = {key(r): r for r in json.loads((RESULTS / main / "results.json").read_text())
                 ["records"] if r["group"] == "main"}
    rerun = [r for r in json.loads((RESULTS / "toy_cpu_family" / f"base{base}" / "results.json")
                                   .read_text())["records"]
             if r["method"] in ("psft", "sft", "sft_paper")]
    assert len(rerun) == 63
    drifted = {("psft", 1, 4), ("psft", 1, 5)} if base == "1236" else set()
    for r in rerun:
        for metric in ("id_acc", "ood_acc", "ood_format"):
            if key(r) in drifted:
                assert abs(r[metric] - committed[key(r)][metric]) <= 0.011, key(r)
            else:
                assert r[metric] == committed[key(r)][metric], (key(r), metric)
        close = 1e-5 if base != "1236" else 1e-3
        for metric in ("entropy", "clipfrac"):
            assert r[metric] == pytest.approx(committed[key(r)][metric], abs=close), key(r)


def _split_by_seed(folder: Path, out: Path, seeds: set, wall: float) -> None:
    """A copy of a committed folder holding only ``seeds``' runs: what ``reproduce --seeds``
    would have written."""
    import shutil

    data = json.loads((folder / "results.json").read_text())
    summary, config = data["summary"], data["summary"]["preset_config"]
    config["seeds"] = [s for s in config["seeds"] if s in seeds]
    summary["wall_seconds"] = wall
    summary["run_seconds"] = {k: v for k, v in summary["run_seconds"].items()
                              if int(k.rsplit("-s", 1)[1]) in seeds}
    summary["sft_small_step_ratio"] = {k: v for k, v in summary["sft_small_step_ratio"].items()
                                       if int(k) in seeds}
    (out / "histories").mkdir(parents=True)
    for path in (folder / "histories").glob("*.jsonl"):
        if int(path.stem.rsplit("-s", 1)[1]) in seeds:
            shutil.copyfile(path, out / "histories" / path.name)
    data["records"] = [r for r in data["records"] if r["seed"] in seeds]
    (out / "results.json").write_text(json.dumps(data, indent=1))


def test_add_seeds_rebuilds_a_folder_from_its_seeds(tmp_path):
    """The committed main comparison split into its last seed and the others, then put together by
    ``add_seeds``, gives its report byte for byte and the same summary and records; a folder with
    a seed in both, or made with another setting, is refused, naming why."""
    from minipsft.lab.results import add_seeds

    folder = RESULTS / "toy_cpu"
    original = json.loads((folder / "results.json").read_text())
    first, second = tmp_path / "first", tmp_path / "second"
    *kept, last = original["summary"]["preset_config"]["seeds"]
    # the wall time split exactly (both parts in one binade): the sum gives it back
    _split_by_seed(folder, first, set(kept), original["summary"]["wall_seconds"] - 64.0)
    _split_by_seed(folder, second, {last}, 64.0)
    with pytest.raises(ValueError, match=r"seeds \[0, 1"):
        add_seeds(first, first)
    figures = add_seeds(first, second)
    assert sorted(figures) == sorted(p.name for p in folder.glob("*.png"))
    assert (first / "report.md").read_bytes() == (folder / "report.md").read_bytes()
    merged = json.loads((first / "results.json").read_text())
    assert merged["summary"] == original["summary"]
    order = lambda r: (r["group"], r["setting"], r["seed"], r["epoch"])  # noqa: E731
    assert sorted(merged["records"], key=order) == sorted(original["records"], key=order)
    other = tmp_path / "other"
    _split_by_seed(folder, other, {last}, 0.0)
    data = json.loads((other / "results.json").read_text())
    data["summary"]["preset_config"]["lr"] = 3e-4
    (other / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"other lr"):
        add_seeds(second, other)
    data = json.loads((other / "results.json").read_text())
    data["summary"]["preset_config"]["lr"] = original["summary"]["preset_config"]["lr"]
    data["records"] = [r for r in data["records"] if r["method"] != "dft"]  # an arm short
    (other / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"other runs"):
        add_seeds(second, other)
    data = json.loads((other / "results.json").read_text())
    data["records"] = [r | {"ood_acc": 0.5} if r["epoch"] == 0 else r for r in original["records"]
                       if r["seed"] == last]  # a base pretrained again, with other weights
    (other / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"other base_model"):
        add_seeds(second, other)


def test_a_folder_with_more_seeds_holds_the_presets_runs():
    """After ``add-seeds`` the committed folders hold seeds 0-4: the notebooks still load them for
    the preset's 0-2 (no run again), and not for seeds the folder lacks."""
    from dataclasses import replace

    from minipsft.lab.presets import PRESETS, same_preset

    saved = json.loads((RESULTS / "toy_cpu" / "results.json").read_text())["summary"]
    assert saved["preset_config"]["seeds"] == [0, 1, 2, 3, 4]
    assert same_preset(saved["preset_config"], PRESETS["cpu"])
    assert not same_preset(saved["preset_config"], replace(PRESETS["cpu"], seeds=(0, 7)))
    assert not same_preset(saved["preset_config"], replace(PRESETS["cpu"], lr=3e-4))
