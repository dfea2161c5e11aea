"""minipsft (SFT and PSFT) against TRL's SFTTrainer on one GPU: the same Qwen2.5-0.5B-sized model
(random weights), the same pre-tokenised data (1/4 prompt, 3/4 completion, no padding), the same
minibatch per optimizer step, bf16, AdamW; tokens/s of each and the ratios, side by side in one run.

    python benchmarks/vs_trl_gpu.py [--seq-len 1024] [--minibatch 16] [--batches 2]

TRL (1.16) runs with its own fused LM head (its default: per-token log-probs, entropy and
top-1 accuracy in chunks), with and without Liger's layer kernels (`use_liger_kernel=True`, which
TRL 1.16 applies to the decoder layers only). Needs `trl` and `datasets` (`pip install trl`) and,
for the Liger row, `liger-kernel`. The first `steps_per_snapshot` steps of every run are warm-up.
"""
import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, TrainerCallback

from gpu_throughput import QWEN25_05B, measure


class Clock(TrainerCallback):
    def __init__(self):
        self.stamps = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def run_trl(args, liger: bool):
    import datasets
    from trl import SFTConfig, SFTTrainer

    from minipsft.char_tokenizer import char_tokenizer

    tok = char_tokenizer("abc")
    g = torch.Generator().manual_seed(0)
    n = args.minibatch * args.steps_per_snapshot * (args.batches + 1)
    n_prompt = args.seq_len // 4
    rows = [{"input_ids": torch.randint(10, QWEN25_05B["vocab_size"], (args.seq_len,),
                                        generator=g).tolist(),
             "completion_mask": [0] * n_prompt + [1] * (args.seq_len - n_prompt)} for _ in range(n)]
    config = Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": args.layers},
                         pad_token_id=tok.pad_token_id)
    cuda = args.device == "cuda"
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else None)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.minibatch,
                        num_train_epochs=1, learning_rate=1e-6, weight_decay=0.1, max_grad_norm=1.0,
                        lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda,
                        max_length=args.seq_len,
                        completion_only_loss=True, logging_steps=10_000, save_strategy="no",
                        report_to="none", seed=0, dataloader_num_workers=0, disable_tqdm=True,
                        use_liger_kernel=liger, gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, callbacks=[clock])
        clock.stamps = [time.perf_counter()]
        trainer.train()
    k = args.steps_per_snapshot
    step = (clock.stamps[-1] - clock.stamps[k]) / (len(clock.stamps) - 1 - k)
    del trainer, model
    memory = float("nan")
    if cuda:
        torch.cuda.empty_cache()
        memory = torch.cuda.max_memory_allocated() / 2**30
    return args.minibatch * args.seq_len / step, memory


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--minibatch", type=int, default=16, help="demonstrations per optimizer step")
    ap.add_argument("--steps-per-snapshot", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2,
                    help="timed snapshots' worth of steps per run")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--layers", type=int, default=QWEN25_05B["num_hidden_layers"])
    ap.add_argument("--device", default="cuda",
                    help="cuda (cpu only to check that the script runs)")
    args = ap.parse_args()
    import trl
    cuda = args.device == "cuda"
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{device}, torch {torch.__version__}, trl {trl.__version__}, "
          f"{args.minibatch} x {args.seq_len} tokens per step")
    rows = []
    # minipsft first: use_liger_kernel patches transformers' Qwen2 classes for the whole process
    for method in ("sft", "psft"):
        for compile in (False, True) if cuda else (False,):
            r = measure(args, method, args.seq_len, args.minibatch, compile, "keep")
            mode = "compiled" if compile else "eager"
            rows.append((f"minipsft {method.upper()} ({mode})", r["tokens_per_s"], r["memory"]))
            print(rows[-1], flush=True)
    for label, liger in (("TRL SFTTrainer", False), ("TRL SFTTrainer + Liger layers", True)):
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            rows.append((label, *run_trl(args, liger)))
        except Exception as e:  # e.g. liger-kernel missing: say so, keep the other rows
            print(f"{label}: failed: {type(e).__name__}: {e}")
        else:
            print(rows[-1], flush=True)
    trl_best = max((r for r in rows if r[0].startswith("TRL")), key=lambda r: r[1], default=None)
    print("\n| run | tokens/s | vs best TRL | peak memory |\n|---|---|---|---|")
    for label, tps, mem in rows:
        ratio = f"{tps / trl_best[1]:.2f}" if trl_best else "n/a"
        print(f"| {label} | {tps:,.0f} | {ratio} | {mem:.1f} GiB |")


if __name__ == "__main__":
    main()
