"""The prepared GPU session runs end to end at smoke size on a CPU (issue 13)."""
import json
import os
import subprocess
import tarfile
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_gpu_session_script_runs_the_comparison_in_pieces_at_smoke_size_on_cpu(tmp_path,
                                                                                   smoke_cache):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PRESET="smoke", DEVICE="cpu",
               SKIP_GPU_TESTS="1", CACHE=str(smoke_cache), MINUTES="0",
               RESULTS=str(tmp_path / "toy_smoke"),
               PYTHON=sys.executable)  # the running interpreter, not whichever is on PATH
    first = subprocess.run(["bash", "benchmarks/gpu_toy_session.sh"], cwd=ROOT,
                           env=dict(env, HARD_S="500"),  # pretraining the base may take minutes
                           capture_output=True, text=True, timeout=600)  # then a spent budget
    assert first.returncode == 3 and "run this script again" in first.stdout, first.stdout[-2000:]
    done = subprocess.run(["bash", "benchmarks/gpu_toy_session.sh"], cwd=ROOT,
                          env=dict(env, MINUTES="8"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    with tarfile.open(out / "toy_smoke.tar.gz") as packed:  # one file back from the device
        packed.extractall(out, filter="data")
    summary = json.loads((out / "toy_smoke" / "results.json").read_text())["summary"]
    assert summary["preset"] == "smoke" and summary["base_loaded_from_cache"]
    assert (out / "toy_smoke" / "report.md").exists()
    timing = (out / "timing.log").read_text()
    assert "reproduce rc 3" in timing and "preset smoke device cpu: reproduce rc 0, wall" in timing
    assert "torch" in (out / "env.log").read_text()
