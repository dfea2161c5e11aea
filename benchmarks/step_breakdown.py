"""Where a training step's time goes on a Qwen2.5-0.5B-sized model (random weights), on one GPU:
forward+backward with transformers' own fused loss, with minipsft's chunked log-probs, and with
the per-token entropy the loop logs; plus the AdamW step. Timings side by side in one run.

    python benchmarks/step_breakdown.py [--seq-len 512] [--minibatch 8]
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from minipsft.speed import token_logprobs

from gpu_throughput import QWEN25_05B


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--minibatch", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_05B), dtype=torch.bfloat16,
                                             attn_implementation="sdpa").cuda()
    ids = torch.randint(10, QWEN25_05B["vocab_size"], (args.minibatch, args.seq_len), device="cuda")
    attn = torch.ones_like(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def hf_loss():
        model(input_ids=ids, attention_mask=attn, labels=ids).loss.backward()

    def ours(entropy):
        def f():
            logp, _ = token_logprobs(model, ids, attn, with_entropy=entropy)
            (-logp.mean()).backward()
        return f

    def forward_only():
        with torch.no_grad():
            token_logprobs(model, ids, attn)

    rows = {"fwd+bwd, transformers loss": timed(hf_loss), "fwd+bwd, minipsft log-probs": timed(ours(False)),
            "fwd+bwd, minipsft log-probs + entropy": timed(ours(True)), "no-grad forward (pi_old snapshot)": timed(forward_only),
            "AdamW step": timed(opt.step)}
    tokens = args.minibatch * args.seq_len
    n = sum(p.numel() for p in model.parameters())
    for name, t in rows.items():
        print(f"{name:40s} {t * 1000:8.1f} ms" + (f"   MFU {6 * n * tokens / t / 989e12:.1%}" if "bwd" in name else ""))
    print(f"{torch.cuda.get_device_name()}, {n / 1e6:.0f}M parameters, minibatch {args.minibatch} x {args.seq_len}")


if __name__ == "__main__":
    main()
