"""Tokens/s and model FLOPs utilisation of SFT and PSFT steps on a Qwen2.5-0.5B-sized model (random
weights built from its config: no hub), side by side in one run, and the PSFT/SFT step-time ratio.

    python benchmarks/gpu_throughput.py [--seq-len 512] [--minibatch 8] [--compile]
        [--head keep|fused|recompute]
    python benchmarks/gpu_throughput.py --matrix --seq-len 1024   # eager/compiled x head x 16/32

The output head (the vocabulary projection and log-softmax, ~8% of the FLOPs with a 151,936-token
vocabulary): "fused" computes each chunk's gradient in the forward pass (fused.fused_head_loss,
CausalLM(fused_head=True)), "keep" keeps the chunks' logits for backward (the GPU default when they
fit), "recompute" recomputes them in backward.
MFU counts 6 * parameters FLOPs per trained token (the usual estimate, attention excluded) against
the GPU's dense bf16 peak (--peak-tflops, default 989 for H100/H200 SXM). PSFT's snapshot forward is
extra work the estimate does not credit, so PSFT's MFU is the useful-work figure. "+attn" adds the
attention score and value matmuls a causal model needs (6 * layers * seq_len * hidden per token).
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from minipsft.char_tokenizer import char_tokenizer
from minipsft.model import CausalLM
from minipsft.train import TrainConfig, train

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True, rope_theta=1e6)
HEADS = {"fused": dict(fused_head=True), "keep": dict(fused_head=False, keep_logits=True),
         "recompute": dict(fused_head=False, keep_logits=False)}


def measure(args, method, seq_len, minibatch, compile, head):
    """One method's training run; returns step seconds, tokens/s, MFU, peak GiB, warm-up seconds."""
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tok = char_tokenizer("abc")  # ids are synthetic; the tokenizer only supplies the pad id
    g = torch.Generator().manual_seed(0)
    batch = minibatch * args.steps_per_snapshot
    n_prompt = seq_len // 4
    vocab = QWEN25_05B["vocab_size"]
    examples = [{"input_ids": torch.randint(10, vocab, (seq_len,), generator=g).tolist(),
                 "completion_mask": [0] * n_prompt + [1] * (seq_len - n_prompt)}
                for _ in range(batch * (args.batches + 1))]
    config = Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": args.layers},
                         pad_token_id=tok.pad_token_id)
    with torch.device(args.device):  # initialise on the device: seconds, not a minute on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else None)
    lm = CausalLM(model, tok, device=args.device, compile=compile, **HEADS[head])
    n_params = sum(p.numel() for p in lm.model.parameters())
    cfg = TrainConfig(method=method, epochs=1, lr=1e-6, batch_size=batch, minibatch_size=minibatch,
                      progress=False)
    stamps = [time.perf_counter()]

    def clock(rec):
        sync()
        stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train(lm, examples, cfg, on_step=clock)
    # the first snapshot warms kernels and the allocator up; time whole snapshots after it
    k = args.steps_per_snapshot
    step = (stamps[-1] - stamps[k]) / (len(stamps) - 1 - k)
    tokens_per_s = minibatch * seq_len / step
    attn = 6 * config.num_hidden_layers * seq_len * config.hidden_size
    peak = args.peak_tflops * 1e12
    result = dict(step=step, tokens_per_s=tokens_per_s, mfu=6 * n_params * tokens_per_s / peak,
                  mfu_attn=(6 * n_params + attn) * tokens_per_s / peak,
                  warmup=stamps[k] - stamps[0],
                  memory=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
                  n_params=n_params)
    del lm, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def compare(args, seq_len, minibatch, compile, head):
    """SFT and PSFT in one setting: one table row."""
    sft = measure(args, "sft", seq_len, minibatch, compile, head)
    psft = measure(args, "psft", seq_len, minibatch, compile, head)
    mode = "compiled" if compile else "eager"
    print(f"| {minibatch} x {seq_len} | {mode} | {head} | {sft['step'] * 1e3:.1f} ms | "
          f"{psft['step'] * 1e3:.1f} ms | {psft['step'] / sft['step']:.3f} | "
          f"{sft['tokens_per_s']:,.0f} | {sft['mfu']:.1%} ({sft['mfu_attn']:.1%}) | "
          f"{psft['mfu']:.1%} | {max(sft['memory'], psft['memory']):.1f} GiB | "
          f"{sft['warmup']:.1f} / {psft['warmup']:.1f} s |", flush=True)
    return sft


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=512,
                    help="tokens per demonstration (1/4 prompt, 3/4 completion)")
    ap.add_argument("--minibatch", type=int, default=8, help="demonstrations per optimizer step")
    ap.add_argument("--steps-per-snapshot", type=int, default=8,
                    help="PSFT minibatch steps per pi_old snapshot")
    ap.add_argument("--batches", type=int, default=3, help="timed batches (snapshots) per method")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    ap.add_argument("--layers", type=int, default=QWEN25_05B["num_hidden_layers"],
                    help="fewer for a quick check")
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to check that the script runs)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the decoder layers and the head's chunks")
    ap.add_argument("--head", choices=tuple(HEADS), default="keep",
                    help="how the output head's gradient is computed (above)")
    ap.add_argument("--matrix", action="store_true",
                    help="eager and compiled x fused, keep, recompute x 16 and 32 x --seq-len")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"{args.layers} layers, {'bf16' if cuda else 'fp32'}, sdpa, "
          f"{args.steps_per_snapshot} steps per snapshot, {args.batches} timed snapshots per run")
    print("| minibatch | mode | head | SFT step | PSFT step | PSFT/SFT | SFT tokens/s | "
          "SFT MFU (+attn) | PSFT MFU | peak memory | first snapshot SFT / PSFT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    if not args.matrix:
        compare(args, args.seq_len, args.minibatch, args.compile, args.head)
        return
    for compile in (True, False):  # compiled first: the figures that matter most if time runs out
        for minibatch in (16, 32):
            for head in HEADS:
                compare(args, args.seq_len, minibatch, compile, head)


if __name__ == "__main__":
    main()
