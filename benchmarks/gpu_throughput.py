"""Tokens/s and model FLOPs utilisation of SFT and PSFT steps on a Qwen2.5-0.5B-sized model (random
weights built from its config: no hub), side by side in one run, and the PSFT/SFT step-time ratio.

    python benchmarks/gpu_throughput.py [--seq-len 512] [--minibatch 8] [--batches 3] [--compile]

MFU counts 6 * parameters FLOPs per trained token (the usual estimate, attention excluded) against
the GPU's dense bf16 peak (--peak-tflops, default 989 for H100/H200 SXM). PSFT's snapshot forward is
extra work the estimate does not credit, so PSFT's MFU is the useful-work figure. "+attn" adds the
attention score and value matmuls a causal model needs (6 * layers * seq_len * hidden per token,
half of PaLM's count, which also credits the masked-out half).
"""
import argparse
import time

import torch
from transformers import Qwen2Config

from minipsft.model import CausalLM, char_tokenizer
from minipsft.train import TrainConfig, train

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True, rope_theta=1e6)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per demonstration (1/4 prompt, 3/4 completion)")
    ap.add_argument("--minibatch", type=int, default=8, help="demonstrations per optimizer step")
    ap.add_argument("--steps-per-snapshot", type=int, default=8, help="PSFT minibatch steps per pi_old snapshot")
    ap.add_argument("--batches", type=int, default=3, help="timed batches (snapshots) per method")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    ap.add_argument("--layers", type=int, default=QWEN25_05B["num_hidden_layers"], help="fewer for a quick check")
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to check that the script runs)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder layers and the vocabulary chunks (CausalLM(compile=True))")
    ap.add_argument("--keep-logits", choices=("auto", "yes", "no"), default="auto",
                    help="keep the vocabulary chunks' logits for backward (yes), recompute them in backward (no), "
                         "or keep them when the free GPU memory holds them twice over (auto, the default of CausalLM)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tok = char_tokenizer("abc")  # ids are synthetic; the tokenizer only supplies the pad id
    g = torch.Generator().manual_seed(0)
    batch = args.minibatch * args.steps_per_snapshot
    n_prompt = args.seq_len // 4
    examples = [{"input_ids": torch.randint(10, QWEN25_05B["vocab_size"], (args.seq_len,), generator=g).tolist(),
                 "completion_mask": [0] * n_prompt + [1] * (args.seq_len - n_prompt)} for _ in range(batch * (args.batches + 1))]
    results = {}
    for method in ("sft", "psft"):
        config = Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": args.layers}, pad_token_id=tok.pad_token_id)
        keep = {"auto": None, "yes": True, "no": False}[args.keep_logits]
        lm = CausalLM.from_config(config, tok, seed=0, device=args.device, compile=args.compile, keep_logits=keep)
        n_params = sum(p.numel() for p in lm.model.parameters())
        cfg = TrainConfig(method=method, epochs=1, lr=1e-6, batch_size=batch, minibatch_size=args.minibatch,
                          progress=False)
        stamps = [time.perf_counter()]

        def clock(rec):
            sync()
            stamps.append(time.perf_counter())

        train(lm, examples, cfg, on_step=clock)
        # the first snapshot warms kernels and the allocator up; time whole snapshots after it
        k = args.steps_per_snapshot
        step = (stamps[-1] - stamps[k]) / (len(stamps) - 1 - k)
        warmup = stamps[k] - stamps[0]
        tokens_per_s = args.minibatch * args.seq_len / step
        results[method] = step
        attn_flops = 6 * config.num_hidden_layers * args.seq_len * config.hidden_size
        print(f"{method.upper():4s} step {step * 1000:7.1f} ms  {tokens_per_s:9.0f} tokens/s  "
              f"MFU {6 * n_params * tokens_per_s / (args.peak_tflops * 1e12):.1%} "
              f"(+attn {(6 * n_params + attn_flops) * tokens_per_s / (args.peak_tflops * 1e12):.1%})  "
              + (f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB  " if cuda else "")
              + f"first snapshot (warm-up{', compile' if args.compile else ''}) {warmup:.1f} s")
        del lm
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, {n_params / 1e6:.0f}M parameters, "
          f"{'bf16' if cuda else 'fp32'}, sdpa, {'compiled layers + vocabulary chunks' if args.compile else 'eager'}, "
          f"keep logits {args.keep_logits}, "
          f"minibatch {args.minibatch} x {args.seq_len} tokens, {args.steps_per_snapshot} steps per snapshot")
    print(f"PSFT/SFT step-time ratio: {results['psft'] / results['sft']:.3f}  (target <= 1.30)")


if __name__ == "__main__":
    main()
