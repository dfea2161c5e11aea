"""What PSFT costs inside TRL: PSFTTrainer against TRL's own SFTTrainer on the same tiny model, data,
order and settings, side by side on CPU, and the step-time ratio (the snapshot forward is the extra work).

    pip install -e ".[trl]" && python benchmarks/trl_psft_overhead.py [--epochs 2] [--threads 2]

Works on a GPU too (``--device cuda``: bf16, the Trainer's own device placement).
"""
import argparse
import statistics
import tempfile
import time

import datasets
import torch
from trl import SFTConfig, SFTTrainer

from step_time import make, rows

from minipsft.trl_trainer import PSFTConfig, PSFTTrainer


def timed(trainer_cls, config_cls, data, args, **extra):
    lm = make()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_cls(output_dir=tmp, per_device_train_batch_size=args.minibatch, num_train_epochs=args.epochs,
                         learning_rate=1e-4, lr_scheduler_type="constant", save_strategy="no", report_to="none",
                         use_cpu=args.device == "cpu", bf16=args.device != "cpu", max_length=128, seed=0,
                         logging_steps=10, disable_tqdm=True, train_sampling_strategy="sequential", **extra)
        trainer = trainer_cls(model=lm.model, args=cfg, train_dataset=datasets.Dataset.from_list(data),
                              processing_class=lm.tokenizer)
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0, trainer.state.global_step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--minibatch", type=int, default=8, help="rows per optimizer step")
    ap.add_argument("--refresh-steps", type=int, default=8, help="PSFT optimizer steps per pi_old snapshot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed runs per trainer; the median counts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = rows()
    timed(SFTTrainer, SFTConfig, data[:32], args)  # warm-up: imports, allocator
    sfts, psfts = [], []
    for _ in range(args.repeats):  # alternate, so that drifts of the machine hit both alike
        sft, steps = timed(SFTTrainer, SFTConfig, data, args)
        sfts.append(sft)
        psfts.append(timed(PSFTTrainer, PSFTConfig, data, args, refresh_steps=args.refresh_steps)[0])
    sft, psft = statistics.median(sfts), statistics.median(psfts)
    print("PSFT/SFT per repeat: " + ", ".join(f"{b / a:.3f}" for a, b in zip(sfts, psfts)))
    print(f"{len(data)} rows x {args.epochs} epochs = {steps} steps of {args.minibatch} rows, {args.device}, "
          f"{args.threads} threads, refresh every {args.refresh_steps} steps")
    print(f"TRL SFTTrainer : {sft:6.2f}s  {1000 * sft / steps:6.1f} ms/step")
    print(f"PSFTTrainer    : {psft:6.2f}s  {1000 * psft / steps:6.1f} ms/step")
    print(f"PSFT/SFT step-time ratio (medians of {args.repeats}): {psft / sft:.3f}")


if __name__ == "__main__":
    main()
