"""Runs saved as they finish (lab/store.py): a second call runs only the missing ones, a time
budget stops starting runs, other settings are refused by name, and a SIGKILL loses only the
runs in flight."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from minipsft.lab.store import RunStore, Unfinished, run_saved


def square(job):  # module level: the process pool pickles it
    time.sleep(job.get("sleep", 0.0))
    return {"job": job, "value": job["x"] ** 2, "history": [0.1 * job["x"]]}


def _key(job):
    return f"x{job['x']}"


JOBS = [{"x": x} for x in range(5)]


def test_a_second_call_runs_only_the_missing_runs(tmp_path):
    calls = []

    def counted(job):
        calls.append(job["x"])
        return square(job)

    store = RunStore(tmp_path, {"preset": "a", "lr": 1e-3})
    full = run_saved(JOBS, counted, _key, store, 1, "runs")
    assert calls == [0, 1, 2, 3, 4] and sorted(p.name for p in store.folder.glob("x*.json")) \
        == [f"x{x}.json" for x in range(5)]
    (store.folder / "x3.json").unlink()  # as if the run had been in flight at a kill
    again = run_saved(JOBS, counted, _key, RunStore(tmp_path, {"preset": "a", "lr": 1e-3}), 1, "r")
    assert calls[5:] == [3] and again == full


@pytest.mark.parametrize("workers", [1, 2])
def test_a_time_budget_stops_new_runs_and_the_same_call_finishes(tmp_path, workers):
    jobs = [dict(j, sleep=0.3) for j in JOBS]
    store = RunStore(tmp_path, {"preset": "a"})
    with pytest.raises(Unfinished) as stop:
        run_saved(jobs, square, _key, store, workers, "runs", deadline=time.time() + 0.4)
    assert 0 < stop.value.remaining < 5
    done = run_saved(jobs, square, _key, store, workers, "runs")
    assert done == run_saved(jobs, square, _key, None, 1, "uninterrupted")


def test_other_settings_are_refused_by_name_unless_overwrite(tmp_path):
    run_saved(JOBS, square, _key, RunStore(tmp_path, {"preset": "a", "p": {"lr": 1e-3}}), 1, "r")
    with pytest.raises(ValueError, match=r"other settings \(p\.lr\).*--overwrite"):
        RunStore(tmp_path, {"preset": "a", "p": {"lr": 2e-3}})
    store = RunStore(tmp_path, {"preset": "a", "p": {"lr": 2e-3}}, overwrite=True)
    assert store.load("x0") is None


SLOW_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
from test_store import JOBS, _key, square
from minipsft.lab.store import RunStore, run_saved
jobs = [dict(j, sleep=0.5) for j in JOBS]
run_saved(jobs, square, _key, RunStore({out!r}, {{"preset": "a"}}), 1, "runs")
"""


def test_a_sigkill_loses_only_the_run_in_flight(tmp_path):
    code = SLOW_RUN.format(tests=os.path.dirname(__file__), out=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    folder = tmp_path / "runs"
    for _ in range(200):  # until two runs are saved
        if len(list(folder.glob("x*.json"))) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = list(folder.glob("x*.json"))
    assert 2 <= len(saved) < 5
    assert all(json.loads(p.read_text())["value"] >= 0 for p in saved)  # none half-written
    jobs = [dict(j, sleep=0.5) for j in JOBS]
    done = run_saved(jobs, square, _key, RunStore(tmp_path, {"preset": "a"}), 1, "runs")
    assert done == run_saved(jobs, square, _key, None, 1, "uninterrupted")
