"""minipsft's SFT against TRL's SFTTrainer on the same tiny model, data, batch size and lr, side by side
on CPU: tokens/s of each and the ratio (goal >= 1.0). TRL is a benchmark-only dependency:

    pip install trl && python benchmarks/vs_trl.py [--epochs 2] [--threads 2]

Both train on completion tokens only with AdamW; minipsft also computes and logs per-token entropy
every step (TRL logs entropy too). The tokens counted are the non-padding tokens of the data set.
"""
import argparse
import tempfile
import time

import torch

from step_time import make, rows

from minipsft.train import TrainConfig, train


def run_trl(lm, data, args):
    import datasets
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.batch, num_train_epochs=args.epochs,
                        learning_rate=args.lr, weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="constant",
                        warmup_steps=0, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True,
                        bf16=False, fp16=False, max_length=128, seed=0, dataloader_num_workers=0, disable_tqdm=True)
        trainer = SFTTrainer(model=lm.model, args=cfg, train_dataset=datasets.Dataset.from_list(data),
                             processing_class=lm.tokenizer)
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = rows()
    lm = make()
    examples = lm.encode(data)
    tokens = sum(len(e["input_ids"]) for e in examples) * args.epochs
    t0 = time.perf_counter()
    train(lm, examples, TrainConfig(method="sft", epochs=args.epochs, lr=args.lr, batch_size=args.batch,
                                    minibatch_size=args.batch, lr_schedule="constant", progress=False))
    ours = time.perf_counter() - t0
    theirs = run_trl(make(), data, args)
    print(f"{len(data)} demos x {args.epochs} epochs, batch {args.batch}, {args.threads} threads, "
          f"{sum(p.numel() for p in lm.model.parameters()) / 1e6:.2f}M-parameter model")
    print(f"minipsft SFT : {ours:6.2f}s  {tokens / ours:8.0f} tokens/s")
    print(f"TRL SFTTrainer: {theirs:6.2f}s  {tokens / theirs:8.0f} tokens/s")
    print(f"minipsft/TRL throughput ratio: {theirs / ours:.2f}  (goal >= 1.0)")


if __name__ == "__main__":
    main()
