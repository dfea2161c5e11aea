"""What the gpu preset costs on one GPU, piece by piece, to size it (issue 13): the base's
pretraining, one evaluation, one run of one epoch, and the same runs several at once on the one GPU
(a tiny model leaves a GPU idle between kernel launches, so concurrent runs may come nearly free).

    python benchmarks/gpu_preset_probe.py --cache DIR [--preset gpu] [--workers 1 4 8]

Prints one line per measurement and, from them, what the full preset (all arms x seeds x epochs)
would take at each worker count.
"""
import argparse
import time
from dataclasses import replace

import torch

from minipsft.lab import toy
from minipsft.lab.presets import PRESETS, arm_config
from minipsft.lab.records import Job, Site
from minipsft.lab.runner import run_jobs


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="folder for the pretrained base")
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8],
                    help="concurrent runs to time (each count runs that many 1-epoch runs)")
    ap.add_argument("--pretrain-rows", type=int, default=None,
                    help="pretrain the base on fewer rows (a quicker, weaker base)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = PRESETS[args.preset]
    if args.pretrain_rows:
        p = replace(p, base=replace(p.base, pretrain_rows=args.pretrain_rows))
    t0 = time.perf_counter()
    base, base_path, cached = toy.pretrained_base(p.base, args.cache, device=device)
    n_params = sum(x.numel() for x in base.model.parameters()) / 1e6
    print(f"base {n_params:.2f}M parameters: {'loaded' if cached else 'pretrained'} in "
          f"{time.perf_counter() - t0:.0f} s ({p.base.pretrain_rows} rows)", flush=True)

    torch.set_num_threads(p.threads)
    evaluator = toy.Evaluator(base, toy.id_rows(p.n_id_eval, seed=1),
                              toy.ood_rows(p.ood_per_task, seed=2), n_samples=p.n_samples)
    t0 = time.perf_counter()
    evaluator(base)
    eval_s = time.perf_counter() - t0
    print(f"one evaluation ({p.n_id_eval} ID, {p.ood_per_task}/task OOD, {p.n_samples} samples): "
          f"{eval_s:.1f} s", flush=True)
    del base, evaluator

    one_epoch = replace(p, epochs=1)
    arms = [a for a in p.arms if a != "sft_small"]
    n_runs = len(p.arms) * len(p.seeds)
    single = None  # seconds per run when alone on the device, and per epoch
    for workers in args.workers:
        site = Site(one_epoch, str(base_path), device, threads=max(1, 16 // workers))
        jobs = [Job(arm, k, "probe", arm, arm_config(one_epoch, arm), site)
                for k, arm in ((k, arms[k % len(arms)]) for k in range(workers))]
        t0 = time.perf_counter()
        runs = run_jobs(jobs, workers, f"{workers} runs at once")
        wall = time.perf_counter() - t0
        mean_run = sum(r.seconds for r in runs) / len(runs)
        if single is None:
            single = (mean_run, mean_run - 2 * eval_s)
        slowdown = mean_run / single[0]  # what sharing the device costs each run
        one_run = p.epochs * single[1] + (p.epochs + 1) * eval_s
        full = n_runs * one_run * slowdown / workers
        print(f"{workers} concurrent 1-epoch runs (2 evaluations each): wall {wall:.1f} s, "
              f"{mean_run:.1f} s per run ({slowdown:.2f}x alone; alone ~{single[1]:.1f} s per "
              f"epoch); full preset ({n_runs} runs x {p.epochs} epochs, {p.epochs + 1} "
              f"evaluations) at {workers} workers ~{full / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
