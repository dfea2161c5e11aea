"""Time per optimizer step of each loss in the family, as a ratio to SFT's, side by side in one
process: the same model, data, order, minibatches and optimizer; only the loss differs.

    python benchmarks/family_cost.py                       # the toy world's cpu base
    python benchmarks/family_cost.py --model smollm2-135m  # a real 135M model, 49k vocabulary

What each loss adds to SFT's forward and backward: PSFT the no-grad pi_old forward of a
snapshot's later minibatches; sft_kl the no-grad reference forward for log pi_ref(target); asft and
sft_kl_vocab that forward plus the whole-vocabulary KL (chunk by chunk). Methods are interleaved
round by round (SFT, PSFT, ..., SFT, PSFT, ...); the first round warms up, untimed; the ratio is
of medians over rounds. Other loads on the machine slow every method alike only on average: run
it alone for clean numbers.
"""
import argparse
import statistics
import time

import torch

from minipsft.lab import handmade, toy
from minipsft.lab.presets import PRESETS, cache_folder
from minipsft.lab.worlds import make_world
from minipsft.model import CausalLM
from minipsft.train import TrainConfig, train

METHODS = ("sft", "psft", "dft", "sft_kl", "asft", "sft_kl_vocab")


def setup(model: str | None, rows: int):
    """The model's path and its training rows."""
    if model is None:  # the toy world's shipped cpu base and its fine-tuning task
        path = make_world(PRESETS["cpu"]).base_model(cache_folder(None), "cpu")[0]
        return str(path), toy.id_rows(rows, seed=0)
    return model, handmade.word_problems(rows, seed=0, instruction="")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model (default: the toy world's cpu base)")
    ap.add_argument("--rows", type=int, default=128, help="demonstrations per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per method")
    ap.add_argument("--batch-size", type=int, default=64, help="demonstrations per snapshot")
    ap.add_argument("--minibatch-size", type=int, default=16, help="demonstrations per step")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path, rows = setup(args.model, args.rows)
    examples = CausalLM.from_pretrained(path, device="cpu").encode(rows)
    per_step = {m: [] for m in METHODS}
    for rnd in range(args.rounds + 1):  # round 0 warms up, untimed
        for method in METHODS:
            lm = CausalLM.from_pretrained(path, device="cpu")
            cfg = TrainConfig(method=method, epochs=1, lr=1e-5, batch_size=args.batch_size,
                              minibatch_size=args.minibatch_size, progress=False)
            t0 = time.perf_counter()
            steps = len(train(lm, examples, cfg)["history"])
            if rnd:
                per_step[method].append((time.perf_counter() - t0) / steps)
    params = sum(p.numel() for p in lm.model.parameters()) / 1e6
    print(f"model {path}: {params:.2f}M parameters, vocabulary {len(lm.tokenizer)}, "
          f"{len(examples)} demonstrations, {steps} steps of {args.minibatch_size}, "
          f"{args.batch_size // args.minibatch_size} steps per snapshot, {args.threads} threads")
    median = {m: statistics.median(t) for m, t in per_step.items()}
    sft = median["sft"]
    for method, times in per_step.items():
        print(f"{method:13s} {1000 * statistics.median(times):8.1f} ms/step   "
              f"ratio to SFT {statistics.median(times) / sft:.2f}   (rounds: "
              + ", ".join(f"{t / s:.2f}" for t, s in zip(times, per_step["sft"])) + ")")
    anchor = {"asft/dft": median["asft"] / median["dft"],
              "sft_kl_vocab/sft": median["sft_kl_vocab"] / sft,
              "sft_kl/sft": median["sft_kl"] / sft}
    print("the anchor alone (each loss over the same loss without it): "
          + ", ".join(f"{k} {v:.2f}" for k, v in anchor.items()))


if __name__ == "__main__":
    main()
