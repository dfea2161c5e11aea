"""Long experiments survive a kill: every finished run is saved the moment it ends
(``OUT/runs/KEY.json``, atomic), and the same command run again runs only the missing ones; one
with other settings (``OUT/runs/settings.json``) is refused, naming the fields, unless
``overwrite``. After a deadline no new run starts; the runs in flight finish and are saved."""
import json
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["RunStore", "Unfinished", "run_saved", "write_atomic"]


class Unfinished(Exception):
    """The time budget ran out with runs left; the same command finishes them."""

    def __init__(self, remaining: int, total: int):
        super().__init__(remaining, total)  # what a process pool pickles
        self.remaining, self.total = remaining, total

    def __str__(self):
        return f"{self.remaining} of {self.total} runs remain"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _differences(saved, current, prefix="") -> list:
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for k in sorted(set(saved) | set(current))
                for d in _differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    return [] if saved == current else [prefix.rstrip(".")]


class RunStore:
    """The saved runs of one results folder."""

    def __init__(self, out, settings: dict, overwrite: bool = False):
        self.folder = Path(out) / "runs"
        settings = json.loads(json.dumps(settings))  # as it reads back from the file
        path = self.folder / "settings.json"
        if path.exists() and overwrite:
            shutil.rmtree(self.folder)
        elif path.exists():
            differ = _differences(json.loads(path.read_text()), settings)
            if differ:
                raise ValueError(f"{out} holds runs made with other settings ({', '.join(differ)})"
                                 ": use another folder, or --overwrite to start it again")
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(settings, indent=1, sort_keys=True))

    def load(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, key: str, run: dict) -> None:
        write_atomic(self.folder / f"{key}.json", json.dumps(run))


def run_saved(jobs: list, fn, key, store: RunStore | None, workers: int, desc: str,
              deadline: float | None = None) -> list:
    """``fn(job)`` for every job not saved in ``store`` yet (``key(job)`` names it), each result
    saved as it finishes; the results in the order of ``jobs``. No run starts after ``deadline``
    (``time.time()``); then ``Unfinished`` is raised once those in flight are saved."""
    saved = {key(j): store.load(key(j)) for j in jobs} if store else {}
    todo = [j for j in jobs if saved.get(key(j)) is None]
    print(f"{desc}: {len(jobs) - len(todo)} of {len(jobs)} runs done, {len(todo)} to run")
    bar = tqdm(total=len(todo), desc=desc)
    started = lambda: deadline is None or time.time() < deadline  # noqa: E731

    def keep(job, result):
        result = json.loads(json.dumps(result))  # as it reads back: a resumed run sees the same
        saved[key(job)] = result
        if store:
            store.save(key(job), result)
        bar.update(1)

    if workers <= 1:
        for job in todo:
            if not started():
                break
            keep(job, fn(job))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            queue, running = list(todo), {}
            while queue or running:
                while queue and len(running) < workers and started():
                    job = queue.pop(0)
                    running[pool.submit(fn, job)] = job
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                failed = [f for f in finished if f.exception() is not None]
                for future in finished:
                    job = running.pop(future)
                    if future.exception() is None:
                        keep(job, future.result())
                if failed:  # the runs saved; the others in flight finish when the pool closes
                    raise failed[0].exception()
    bar.close()
    missing = sum(saved.get(key(j)) is None for j in jobs)
    if missing:
        raise Unfinished(missing, len(jobs))
    return [saved[key(j)] for j in jobs]
