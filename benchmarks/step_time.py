"""PSFT vs SFT wall time per epoch on the same tiny model and data, side by side in one process.

    python benchmarks/step_time.py [--repeats 3] [--threads 2]

Both methods get the same data order, minibatches and optimizer; PSFT additionally computes log pi_old
for the later minibatches of each snapshot (the first reuses its own training forward). Runs are
interleaved (SFT, PSFT, SFT, PSFT, ...) and the median of each is compared. Target: PSFT/SFT <= 1.30.
"""
import argparse
import statistics
import time

import torch
from transformers import Qwen2Config

from minipsft.char_tokenizer import char_tokenizer
from minipsft.model import CausalLM
from minipsft.train import TrainConfig, train


def make(seed=0, hidden=128, layers=4, device="cpu"):
    tok = char_tokenizer("0123456789+=*- ")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return CausalLM.from_config(cfg, tok, seed=seed, device=device)


def rows(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = torch.randint(100, 10_000, (2,), generator=g).tolist()
        out.append({"prompt": f"{a}*{b}=", "completion": f"{a}*{b}={a * b} " * 3})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per method")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--batch-size", type=int, default=64, help="demonstrations per pi_old snapshot")
    ap.add_argument("--minibatch-size", type=int, default=8, help="demonstrations per optimizer step")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 on cuda)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm0 = make()
    examples = lm0.encode(rows())
    times = {"sft": [], "psft": []}
    for rep in range(args.repeats + 1):  # the first round warms up kernels and allocator, untimed
        for method in ("sft", "psft"):
            lm = make(device=args.device)
            cfg = TrainConfig(method=method, epochs=1, lr=1e-4, batch_size=args.batch_size,
                              minibatch_size=args.minibatch_size, progress=False)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train(lm, examples, cfg)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep:
                times[method].append(time.perf_counter() - t0)
    sft, psft = statistics.median(times["sft"]), statistics.median(times["psft"])
    steps = len(examples) // args.minibatch_size
    print(f"model: {sum(p.numel() for p in lm0.model.parameters()) / 1e6:.2f}M params, {len(examples)} demos, "
          f"{steps} steps/epoch, {args.batch_size // args.minibatch_size} steps per pi_old snapshot, "
          f"{args.threads} threads, device {args.device}")
    print(f"SFT  epoch: {sft:.2f}s (median of {args.repeats})")
    print(f"PSFT epoch: {psft:.2f}s (median of {args.repeats})")
    print(f"PSFT/SFT time ratio: {psft / sft:.3f}  (target <= 1.30)")


if __name__ == "__main__":
    main()
