"""Command line: ``python -m minipsft train --model ID --data FILE --method psft --out DIR``; every
``TrainConfig`` field is a flag (``eps_high`` -> ``--eps-high``). Errors are one line naming the
thing and the fix (``--debug`` or ``MINIPSFT_DEBUG=1``: the traceback). The lab's commands
(reproduce, compare, across-bases, family, claims, reproduce-rl) are in ``lab/commands.py``."""
import argparse
import dataclasses
import json
import os
import shlex
import sys
import typing
from pathlib import Path

import torch

from .data import load_rows
from .losses import LOSSES
from .errors import DataError
from .logprobs import heldout_eval
from .model import CausalLM
from .lab.commands import COMMANDS, add_commands, add_parser, examples, wrap
from .lab.store import Unfinished
from .runs import RunFolder, summarize
from .train import NonFiniteLossError, TrainConfig, train


# errors with a message a user can act on: one line, no traceback (OSError: a missing file, a run)
EXPECTED_ERRORS = (DataError, ValueError, OSError, NonFiniteLossError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """States a flag's default once: appended only when the flag is optional, has a default and
    its help does not already speak of one; the description and examples keep their lines."""

    def _get_help_string(self, action):
        text = action.help or ""
        no_default = (action.default is None or action.default is False or action.required
                      or action.default == argparse.SUPPRESS or action.default == [])
        if no_default or "default" in text or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"{help_text} (default: {'on' if f.default else 'off'})")
        else:
            parser.add_argument(flag, type=hints[f.name], default=f.default, help=help_text,
                                choices=tuple(LOSSES) if f.name == "method" else None)


def _add_train(sub, options: dict) -> None:
    p = add_parser(
        sub, options, "train", "fine-tune a causal LM with SFT, PSFT, DFT, SFT+KL or ASFT",
        "Fine-tune a Hugging Face causal LM on a JSONL/Parquet file in TRL's prompt-completion or "
        "conversational format. Writes OUT/history.jsonl (one line per optimizer step), "
        "OUT/evals.jsonl, OUT/checkpoint.pt, OUT/final/ (save_pretrained) and, at the end, "
        "OUT/summary.json.",
        "python -m minipsft train --model Qwen/Qwen2.5-0.5B-Instruct --data train.jsonl \\\n"
        "      --method psft --lr 1e-6 --out runs/psft",
        "python -m minipsft train --model Qwen/Qwen2.5-1.5B-Instruct --data train.jsonl \\\n"
        "      --method psft --lora-r 16 --lr 1e-4 --out runs/psft-lora --merge-lora")
    p.add_argument("--model", required=True,
                   help="hub id or local folder of a causal LM and its tokenizer")
    p.add_argument("--data", required=True,
                   help="training data: .jsonl/.json/.parquet with prompt+completion or messages")
    p.add_argument("--eval-data",
                   help="held-out data in the same format: NLL and entropy on it after every epoch")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--all-assistant-turns", action="store_true",
                   help="conversations: train on every assistant message (TRL's "
                        "assistant_only_loss), not only the last")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest sequence in tokens (default: the model's context)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ...; auto = cuda when available")
    p.add_argument("--dtype", default="auto",
                   help="float32, bfloat16, ...; auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (a different --lr or --grad-clip is "
                        "allowed, e.g. lower after a NaN stop, with a warning)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in OUT (refused without it or --resume)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (less GPU memory, ~30%% more compute)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder layers (one graph shared by all) and the "
                        "vocabulary log-softmax; the first steps are slower while it compiles")
    lora = p.add_argument_group("LoRA (needs peft; pi_old stays stored log-probs, no model copy)")
    lora.add_argument("--lora-r", type=int, default=0,
                      help="train a LoRA adapter of this rank instead of every weight; 0 = off")
    lora.add_argument("--lora-alpha", type=float, default=None,
                      help="LoRA scaling alpha (default: 2 x rank)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    lora.add_argument("--lora-target-modules", nargs="+", default=["all-linear"],
                      help="module names to adapt (default: all-linear, every linear layer but "
                           "the output head)")
    lora.add_argument("--merge-lora", action="store_true",
                      help="also save OUT/merged/: the model with the adapter merged in")
    _add_config_flags(p)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also MINIPSFT_DEBUG=1)")
    parser = argparse.ArgumentParser(
        prog="python -m minipsft", formatter_class=HelpFormatter,
        description=wrap("Proximal Supervised Fine-Tuning: fine-tune a causal LM (train), "
                          "reproduce the paper's claims in a toy world or on GSM8K (reproduce), "
                          "compare SFT and PSFT on your own data (compare), "
                          "RL after fine-tuning (reproduce-rl)."),
        epilog=examples("python -m minipsft train --help",
                         "python -m minipsft compare --help",
                         "python -m minipsft reproduce --preset quick --out runs/quick"))
    sub = parser.add_subparsers(dest="command", required=True)
    options = dict(formatter_class=HelpFormatter, parents=[common])  # every command's
    _add_train(sub, options)
    add_commands(sub, options)  # reproduce, compare, across-bases, family, claims, ...
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("MINIPSFT_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        (_train_command if args.command == "train" else COMMANDS[args.command])(args)
    except Unfinished as stop:  # the time budget ran out: the same command finishes the folder
        again = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--overwrite"]
        print(f"stopped after {args.max_minutes:g} minutes: {stop}; the same command finishes "
              f"them: python -m minipsft {shlex.join(again)}")
        sys.exit(3)
    except EXPECTED_ERRORS as e:
        if debug:
            raise
        sys.exit(f"error: {e}" + ("" if "\n" in str(e) else " (--debug shows the traceback)"))


def _train_command(args) -> None:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    cfg.check()
    out = Path(args.out)
    # everything that can be checked without the model first: a download can take minutes
    if args.merge_lora and not args.lora_r:
        raise ValueError("--merge-lora needs --lora-r (there is no adapter to merge)")
    run = RunFolder(out, resume=args.resume, overwrite=args.overwrite)
    rows = load_rows(args.data)
    eval_rows = load_rows(args.eval_data) if args.eval_data else None
    lm = CausalLM.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                  gradient_checkpointing=args.gradient_checkpointing,
                                  compile=args.compile)
    if args.lora_r:
        torch.manual_seed(cfg.seed)  # the adapter's initial weights follow --seed
        targets = args.lora_target_modules
        lm.add_lora(args.lora_r, args.lora_alpha, args.lora_dropout,
                    targets[0] if targets == ["all-linear"] else targets)
    # every row is encoded before the first step: rows the model cannot train on fail fast
    kw = dict(max_length=args.max_length, all_assistant_turns=args.all_assistant_turns)
    examples = lm.encode(rows, **kw)
    heldout = lm.encode(eval_rows, **kw) if eval_rows else None
    eval_fn = (lambda lm: heldout_eval(lm, heldout)) if eval_rows else None
    result = train(lm, examples, cfg, eval_fn=eval_fn, run=run)
    if args.lora_r and args.merge_lora:
        lm.save_merged(out / "merged")
    summary = summarize(result["history"], cfg)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
          f"final NLL {summary['final_nll']:.4f}, entropy {summary['final_entropy']:.4f}, "
          f"{summary['tokens_per_s']:,.0f} tokens/s; {out / 'summary.json'}")
    if summary["note"]:
        print(summary["note"])
