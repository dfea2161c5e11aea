"""The committed notebooks carry the outputs of a real run: every code cell executed, figures present.
(CI re-runs them through nbval in the small preset; this test checks what GitHub shows.)"""
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_the_series_is_there():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_executed_with_outputs(path):
    book = nbformat.read(path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code, "no code cells"
    unexecuted = [i for i, c in enumerate(code) if c.execution_count is None]
    assert not unexecuted, f"code cells {unexecuted} were not executed"
    assert all(c.outputs for c in code if "NBVAL_CHECK_OUTPUT" in c.source), "checked cells need outputs"
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert images >= 1, "no figure in the committed outputs"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"a cell raised: {errors[0].get('ename')}"
