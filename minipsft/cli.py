"""Command line: ``python -m minipsft train --model PATH_OR_ID --data FILE --method psft --out DIR``.

Every ``TrainConfig`` field is a flag (``eps_high`` -> ``--eps-high``) with the field's help text.
"""
import argparse
import dataclasses
import json
import sys
import typing

from .data import load_rows
from .model import CausalLM, DataError
from .train import METHODS, NonFiniteLossError, TrainConfig, heldout_eval, train


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=hints[f.name], default=f.default, help=help_text,
                                choices=METHODS if f.name == "method" else None)


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every experiment command shares."""
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--cache", default=None, help="base-model cache folder (default: $MINIPSFT_CACHE or ~/.cache/minipsft)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    parser.add_argument("--workers", type=int, default=None, help="parallel runs (processes); default: the preset's")
    parser.add_argument("--device", default="auto", help="cpu or cuda (auto: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minipsft", description="Proximal Supervised Fine-Tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune a causal LM with SFT, PSFT, DFT or SFT+KL",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Fine-tune a Hugging Face causal LM on a JSONL/Parquet file in TRL's "
                                   "prompt-completion or conversational format. Writes OUT/history.jsonl "
                                   "(one line per optimizer step), OUT/evals.jsonl, OUT/checkpoint.pt and "
                                   "OUT/final/ (save_pretrained).")
    p.add_argument("--model", required=True, help="hub id or local folder of a causal LM and its tokenizer")
    p.add_argument("--data", required=True, help="training data: .jsonl/.json/.parquet with prompt+completion or messages")
    p.add_argument("--eval-data", help="held-out data in the same format: NLL and entropy on it after every epoch")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-length", type=int, default=None, help="longest sequence in tokens (default: the model's context)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, ... (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (less GPU memory, ~30%% more compute)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder layers (one graph shared by all) and the vocabulary log-softmax; "
                        "the first steps are slower while it compiles")
    _add_config_flags(p)

    r = sub.add_parser("reproduce", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="reproduce the paper's epoch-stability claims in the toy world",
                       description="Pretrain (or load from the cache) the toy world's base model, fine-tune it with "
                                   "PSFT, SFT (paper recipe, same schedule, PSFT's step size), SFT+KL and DFT over "
                                   "several seeds, evaluate every epoch, and write DIR/results.json, DIR/report.md, "
                                   "DIR/histories/ and DIR/epoch_stability.png, DIR/tradeoff.png (and "
                                   "DIR/ablations.png).")
    r.add_argument("--preset", choices=["smoke", "cpu", "gpu", "gsm8k"], default="cpu",
                   help="toy world: smoke (<1 min, CI), cpu (3 seeds, ~14 min on 2 cores), gpu (larger, one GPU); "
                        "gsm8k: a real model (--model) on GSM8K with TruthfulQA/ARC as OOD, one GPU")
    _add_run_flags(r)
    r.add_argument("--ablations", nargs="*", default=[], choices=["refresh", "eps", "warmup"],
                   help="also run these PSFT ablations (refresh period; eps_high and no clip; SFT warm-up)")
    r.add_argument("--skip-main", action="store_true", help="run only the ablations")
    r.add_argument("--model", default=None, help="gsm8k preset: hub id or folder of the model to fine-tune")
    r.add_argument("--data-dir", default=None, help="gsm8k preset: local files instead of the hub "
                   "(gsm8k_train.jsonl, gsm8k_test.jsonl, truthfulqa_mc.jsonl, arc_challenge.jsonl in the hub schemas)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a preset setting, e.g. --set n_train=512 --set lr=2e-6 (see experiments.Preset)")

    g = sub.add_parser("reproduce-rl", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="GRPO from the base model and from the SFT and PSFT checkpoints (toy world)",
                       description="Fine-tune the toy base with PSFT, SFT (paper recipe) and SFT (PSFT's lr) as "
                                   "'reproduce' does, keeping each run's best-ID epoch, then run the same GRPO "
                                   "stage from the base and from each checkpoint, evaluating ID/OOD accuracy and "
                                   "entropy along the way. Writes DIR/finetune/ (a reproduce folder), "
                                   "DIR/results.json, DIR/report.md, DIR/histories/ and DIR/rl_after_finetuning.png.")
    g.add_argument("--preset", choices=["smoke", "cpu", "gpu"], default="cpu",
                   help="smoke (<1 min, CI), cpu (3 seeds, ~15 min on 2 cores with the base model cached, ~20 without), "
                        "gpu (larger, one GPU)")
    _add_run_flags(g)
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override an RL setting, e.g. --set steps=100 --set lr=5e-5 (see experiments_rl.RLPreset)")
    return parser


def _overrides(pairs, preset_class=None) -> dict:
    from .experiments import Preset

    types = typing.get_type_hints(preset_class or Preset)
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types or key in ("base", "arms", "seeds", "starts") or not value:
            raise SystemExit(f"error: --set {pair!r}: use FIELD=VALUE with a number, true/false or text field of "
                             f"{(preset_class or Preset).__name__}")
        kind = types[key]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise SystemExit(f"error: --set {pair!r}: {key} takes true or false")
            out[key] = value.lower() in ("true", "1", "yes")
        else:
            out[key] = value if kind is str else (int(value) if kind in (int, int | None) else float(value))
    return out


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "reproduce-rl":
        from .experiments_rl import RLPreset, reproduce_rl

        try:
            reproduce_rl(args.preset, args.out, cache_dir=args.cache, seeds=args.seeds, workers=args.workers,
                         device=args.device, **_overrides(args.overrides, RLPreset))
        except ValueError as e:
            sys.exit(f"error: {e}")
        return
    if args.command == "reproduce":
        from .experiments import reproduce

        try:
            reproduce(args.preset, args.out, cache_dir=args.cache, seeds=args.seeds, workers=args.workers,
                      ablations=args.ablations, main=not args.skip_main, device=args.device, model=args.model,
                      data_dir=args.data_dir, **_overrides(args.overrides))
        except ValueError as e:
            sys.exit(f"error: {e}")
        return
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        cfg.check()
        lm = CausalLM.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                      gradient_checkpointing=args.gradient_checkpointing, compile=args.compile)
        # every row is read, checked and encoded before the first step: bad data fails fast
        examples = lm.encode(load_rows(args.data), max_length=args.max_length)
        eval_fn = None
        if args.eval_data:
            heldout = lm.encode(load_rows(args.eval_data), max_length=args.max_length)
            eval_fn = lambda lm: heldout_eval(lm, heldout)  # noqa: E731
        result = train(lm, examples, cfg, out_dir=args.out, eval_fn=eval_fn, resume=args.resume)
    except (DataError, ValueError, FileNotFoundError, NonFiniteLossError) as e:
        sys.exit(f"error: {e}")
    last = result["history"][-1]
    print(json.dumps({"steps": last["step"], "loss": last["loss"], "entropy": last["entropy"],
                      "clipfrac": last["clipfrac"], "out": args.out}))
