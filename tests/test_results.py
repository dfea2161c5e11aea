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
