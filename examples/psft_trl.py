"""PSFT with TRL's SFTTrainer, on one GPU or many (accelerate / DeepSpeed / FSDP).

Every ``PSFTConfig`` (= TRL ``SFTConfig`` + eps_low, eps_high, refresh_steps, sft_warmup_steps) field is a flag.

    # one process
    python examples/psft_trl.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/Capybara \
        --output_dir out --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --refresh_steps 8 \
        --learning_rate 1e-6 --bf16
    # 8 GPUs with DeepSpeed ZeRO-3 (per-device 4 x accumulation 1 x 8 GPUs = minibatch 32)
    accelerate launch --config_file examples/deepspeed_zero3.yaml examples/psft_trl.py ...
    # a dry run on CPU with a tiny model built here (no hub), two data-parallel processes (what CI runs;
    # accelerate's --cpu launcher starts several processes only through MPI, its torchrun launcher runs
    # on CPU with the gloo backend when the script asks for the CPU with --use_cpu)
    accelerate launch --multi_gpu --num_processes 2 examples/psft_trl.py --tiny --output_dir /tmp/psft_tiny \
        --max_steps 8 --refresh_steps 4 --learning_rate 1e-2 --use_cpu --bf16 False --report_to none --logging_steps 1

Writes the Trainer's usual output plus ``OUTPUT_DIR/log_history.jsonl`` (every logged record, with
``clipfrac``, ``ratio_mean``, ``approx_kl``, ``entropy``) and ``OUTPUT_DIR/run_info.json``.
"""
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from minipsft.trl_trainer import PSFTConfig, PSFTTrainer


@dataclass
class ScriptArgs:
    model_name_or_path: str | None = field(default=None, metadata={"help": "hub id or local folder of a causal LM"})
    dataset: str | None = field(default=None, metadata={"help": "hub data set or a local .json/.jsonl file in TRL's "
                                                                "prompt-completion or conversational format"})
    dataset_config: str | None = field(default=None, metadata={"help": "hub data set config"})
    dataset_split: str = field(default="train", metadata={"help": "split to train on"})
    tiny: bool = field(default=False, metadata={"help": "build a tiny random model and synthetic addition data "
                                                        "here (no hub): a dry run of the whole setup"})


def tiny_setup(seed: int = 0):
    """A 2-layer Qwen2-architecture model with a character tokenizer and 64 addition demonstrations."""
    from transformers import Qwen2Config

    from minipsft.char_tokenizer import char_tokenizer
    from minipsft.model import CausalLM

    tok = char_tokenizer("0123456789+= ")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    lm = CausalLM.from_config(cfg, tok, seed=seed, device="cpu", dtype="float32")
    rng = random.Random(seed)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)}
            for a, b in ((rng.randrange(50), rng.randrange(50)) for _ in range(64))]
    return lm.model, tok, rows


def main():
    script, args = HfArgumentParser((ScriptArgs, PSFTConfig)).parse_args_into_dataclasses()
    from datasets import Dataset, load_dataset

    if script.tiny:
        model, tokenizer, rows = tiny_setup(args.seed)
        dataset = Dataset.from_list(rows)
    else:
        if not script.model_name_or_path or not script.dataset:
            raise SystemExit("error: pass --model_name_or_path and --dataset (or --tiny for a dry run)")
        model, tokenizer = script.model_name_or_path, None
        if Path(script.dataset).is_file():
            dataset = load_dataset("json", data_files=script.dataset, split="train")
        else:
            dataset = load_dataset(script.dataset, script.dataset_config, split=script.dataset_split)
    trainer = PSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    if trainer.accelerator.is_main_process:
        out = Path(args.output_dir)
        (out / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trainer.state.log_history))
        (out / "run_info.json").write_text(json.dumps({"num_processes": trainer.accelerator.num_processes,
                                                       "global_step": trainer.state.global_step,
                                                       "refresh_steps": args.refresh_steps}, indent=2))
    # tear the process group down before exit: left to the interpreter's shutdown, gloo's threads
    # can abort a rank ("terminate called without an active exception") after training is done
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
