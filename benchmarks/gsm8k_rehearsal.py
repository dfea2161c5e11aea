"""A dress rehearsal of notebook 06 (the gsm8k preset) at real size, without the hub: a model of
Qwen2.5-0.5B's shape (151,936-token vocabulary, 24 layers, bf16) with random weights, and synthetic
rows in the hub schemas of GSM8K, TruthfulQA MC1 and ARC-Challenge, through the gsm8k preset's exact
code path (``runner.reproduce("gsm8k", model=..., data_dir=...)``): one arm, one epoch, a
reduced evaluation. Prints the time per epoch, the time of one evaluation and the peak GPU memory.

    python benchmarks/gsm8k_rehearsal.py --out DIR [--n-train 2048] [--n-eval 64] [--small]

The tokenizer is character-level (no hub), so the synthetic texts are sized in characters to what
Qwen's tokenizer makes of GSM8K (a prompt of ~110 tokens with the chat template, a worked answer of
~120): the token counts are printed. A random model never emits EOS, so every greedy generation runs
to ``max_new_tokens``: the evaluation time is an upper bound. ``--small``: a tiny shape, for a CPU
check of the script.
"""
import argparse
import json
import random
import string
import time
from pathlib import Path

import torch

from minipsft.lab import real
from minipsft.lab.presets import PRESETS
from minipsft.lab.runner import reproduce
from minipsft.char_tokenizer import char_tokenizer
from minipsft.model import CausalLM

QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def words(rng, n_chars: int) -> str:
    text = ""
    while len(text) < n_chars:
        text += "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) + " "
    return text[:n_chars].strip()


def write_data(folder: Path, n_train: int, n_eval: int, seed: int = 0):
    """GSM8K-, TruthfulQA- and ARC-shaped JSONL files (the names ``real.LOCAL_FILES`` expects)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def gsm8k(n):
        return [{"question": words(rng, rng.randint(40, 140)),
                 "answer": words(rng, rng.randint(40, 260)) + f"\n#### {rng.randint(1, 999)}"}
                for _ in range(n)]

    truthfulqa = [{"question": words(rng, rng.randint(30, 90)),
                   "mc1_targets": {"choices": [words(rng, rng.randint(10, 60)) for _ in range(5)],
                                   "labels": [1, 0, 0, 0, 0]}} for _ in range(n_eval)]
    arc = [{"question": words(rng, rng.randint(60, 200)),
            "choices": {"text": [words(rng, rng.randint(5, 40)) for _ in range(4)],
                        "label": ["A", "B", "C", "D"]}, "answerKey": "B"} for _ in range(n_eval)]
    for name, rows in (("gsm8k_train", gsm8k(n_train)), ("gsm8k_test", gsm8k(n_eval)),
                       ("truthfulqa_mc", truthfulqa), ("arc_challenge", arc)):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def write_model(folder: Path, shape: dict, device: str):
    """A model of ``shape`` with random weights and a character tokenizer padded with filler tokens
    up to the vocabulary size (so that every id the model can emit decodes)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = char_tokenizer(string.ascii_lowercase + string.digits + " \n#.,?:-+=*/$()", "chatml")
    filler = [f"<f{i}>" for i in range(shape["vocab_size"] - len(tok))]
    tok.add_tokens(filler)
    config = Qwen2Config(**shape, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    CausalLM(model, tok, device=device).save_pretrained(folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the model, data and results")
    ap.add_argument("--n-train", type=int, default=2048, help="training rows (the preset's 2048)")
    ap.add_argument("--n-eval", type=int, default=64,
                    help="GSM8K test rows and items per OOD set (the preset: 250)")
    ap.add_argument("--small", action="store_true", help="a tiny shape (a CPU check)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    t0 = time.perf_counter()
    write_data(out / "data", args.n_train, args.n_eval)
    write_model(out / "model", SMALL if args.small else QWEN_05B, device)
    print(f"model and data written in {time.perf_counter() - t0:.0f} s", flush=True)

    lm = CausalLM.from_pretrained(out / "model", device=device)
    data = real.world_data(args.n_train, args.n_eval, args.n_eval, out / "data")
    p = PRESETS["gsm8k"]
    lengths = [len(e["input_ids"]) for e in lm.encode(data["train"], max_length=p.max_length)]
    completion = [sum(e["completion_mask"]) for e in lm.encode(data["train"])]
    print(f"tokens per training row: mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}; "
          f"completion mean {sum(completion) / len(completion):.0f}", flush=True)
    evaluator = real.Evaluator(lm, data["test"], data["ood"], p.max_new_tokens,
                                           p.max_length)
    evaluator(lm)  # once to warm up (CUDA kernels, caches), then timed
    if device == "cuda":
        torch.cuda.synchronize()
    t_eval = time.perf_counter()
    evaluator(lm)
    if device == "cuda":
        torch.cuda.synchronize()
    eval_s = time.perf_counter() - t_eval
    print(f"one evaluation ({args.n_eval} GSM8K rows greedy to {p.max_new_tokens} tokens, "
          f"{args.n_eval} items x 2 OOD sets): {eval_s:.1f} s", flush=True)
    del lm, evaluator
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    res = reproduce("gsm8k", out / "results", model=str(out / "model"),
                    data_dir=str(out / "data"), device=device, arms=("psft",), epochs=1,
                    n_train=args.n_train, n_id_eval=args.n_eval, ood_per_task=args.n_eval)
    run_s = res["summary"]["run_seconds"]["psft-s0"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    epoch_s = run_s - 2 * eval_s  # the run evaluates before training and after the epoch
    full_eval_s = eval_s * 250 / args.n_eval
    print(f"psft, 1 epoch of {args.n_train} rows incl. 2 evaluations: {run_s:.1f} s; "
          f"training alone ~{epoch_s:.1f} s per epoch; peak GPU memory {peak:.1f} GiB")
    print(f"notebook 06 estimate (gsm8k preset: 3 arms x 4 epochs, 5 evaluations of 250 rows/items "
          f"each, ~{full_eval_s:.0f} s per evaluation): "
          f"{3 * (4 * epoch_s + 5 * full_eval_s) / 60:.0f} min")


if __name__ == "__main__":
    main()
