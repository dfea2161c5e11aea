"""A long experiment survives a kill (issue 24): ``reproduce`` saves each run as it ends, the same
call resumes and ends with the uninterrupted run's results, a time budget stops it cleanly, and
other settings are refused by name."""
import signal
import subprocess
import sys
import time

import pytest

from minipsft.lab.results import load_results
from minipsft.lab.runner import reproduce
from minipsft.lab.store import Unfinished

SMALL = dict(arms=("psft", "sft"), epochs=1, seeds=(0, 1), workers=1, device="cpu")
KILLED = """
from minipsft.lab.runner import reproduce
reproduce("smoke", {out!r}, cache_dir={cache!r}, **{small!r})
"""


def _result(out) -> tuple:
    """What must not depend on an interruption: every eval record, every step's history
    (without its tokens/s, a timing)."""
    res = load_results(out)
    histories = {r.job.name: [{k: v for k, v in h.items() if k != "tokens_per_s"}
                              for h in r.history] for r in res["runs"]}
    return res["records"], histories


def test_a_killed_reproduce_resumes_to_the_uninterrupted_result(tmp_path, capsys, smoke_cache):
    cache = smoke_cache
    reproduce("smoke", tmp_path / "full", cache_dir=cache, **SMALL)
    out = tmp_path / "cut"
    code = KILLED.format(out=str(out), cache=str(cache), small=SMALL)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(1200):  # until the first run is saved, then SIGKILL
        if list((out / "runs").glob("main-*.json")) or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    with pytest.raises(Unfinished) as stop:  # a time budget already spent: no run starts
        reproduce("smoke", out, cache_dir=cache, max_minutes=0, **SMALL)
    assert 0 < stop.value.remaining < 4 and "runs done" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"other settings \(preset_config\.lr\)"):
        reproduce("smoke", out, cache_dir=cache, lr=2e-3, **SMALL)
    reproduce("smoke", out, cache_dir=cache, **SMALL)
    assert _result(out) == _result(tmp_path / "full")


def test_the_cli_says_what_remains_and_the_command_that_finishes_it(tmp_path, smoke_cache):
    argv = ["reproduce", "--preset", "smoke", "--out", str(tmp_path / "out"), "--cache",
            str(smoke_cache), "--device", "cpu", "--seeds", "0", "--max-minutes", "0",
            "--set", "epochs=1"]
    done = subprocess.run([sys.executable, "-m", "minipsft", *argv], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "runs remain; the same command finishes them: python -m minipsft reproduce" \
        in done.stdout and "--max-minutes 0" in done.stdout
