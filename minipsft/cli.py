"""Command line: ``python -m minipsft train --model ID --data FILE --method psft --out DIR``.

Every ``TrainConfig`` field is a flag (``eps_high`` -> ``--eps-high``) with the field's help text.
Errors are one line naming the thing and the fix; ``--debug`` (or ``MINIPSFT_DEBUG=1``) shows the
traceback instead.
"""
import argparse
import dataclasses
import json
import os
import sys
import textwrap
import typing
from pathlib import Path

import torch

from .data import load_rows
from .losses import LOSSES
from .errors import DataError
from .logprobs import heldout_eval
from .model import CausalLM
from .lab.experiments import ABLATIONS, ARMS, PRESETS, Preset
from .lab.experiments import RLPreset
from .runs import RunFolder, summarize
from .train import NonFiniteLossError, TrainConfig, train


# errors with a message a user can act on: one line, no traceback (OSError: missing files, a folder
# that holds a run, permissions)
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


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def _examples(*lines) -> str:
    return "examples:\n" + "\n".join("  " + line for line in lines)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if hints[f.name] is bool:
            on_off = " (default: on)" if f.default else " (default: off)"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text + on_off)
        else:
            parser.add_argument(flag, type=hints[f.name], default=f.default, help=help_text,
                                choices=tuple(LOSSES) if f.name == "method" else None)


def _add_run_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags every experiment command shares."""
    parser.add_argument("--out", required=required, help="output folder (required)")
    parser.add_argument("--cache", default=None,
                        help="base-model cache folder "
                             "(default: $MINIPSFT_CACHE or ~/.cache/minipsft)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="override the preset's seeds")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel runs (processes); default: the preset's")
    parser.add_argument("--device", default="auto", help="cpu or cuda; auto = cuda when available")


_NOT_SETTABLE = ("base", "arms", "seeds", "starts")


def _set_help(preset_class, where: str) -> str:
    names = [f.name for f in dataclasses.fields(preset_class) if f.name not in _NOT_SETTABLE]
    return ("override a preset setting (repeatable), e.g. --set lr=2e-6; fields: "
            + ", ".join(names) + f" (each preset's values: {where})")


def _add_train(sub, common) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a causal LM with SFT, PSFT, DFT or SFT+KL",
        formatter_class=HelpFormatter, parents=[common],
        description=_wrap(
            "Fine-tune a Hugging Face causal LM on a JSONL/Parquet file in TRL's prompt-completion "
            "or conversational format. Writes OUT/history.jsonl (one line per optimizer step), "
            "OUT/evals.jsonl, OUT/checkpoint.pt, OUT/final/ (save_pretrained) and, at the end, "
            "OUT/summary.json."),
        epilog=_examples(
            "python -m minipsft train --model Qwen/Qwen2.5-0.5B-Instruct --data train.jsonl \\\n"
            "      --method psft --lr 1e-6 --out runs/psft",
            "python -m minipsft train --model Qwen/Qwen2.5-1.5B-Instruct --data train.jsonl \\\n"
            "      --method psft --lora-r 16 --lr 1e-4 --out runs/psft-lora --merge-lora"))
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
                   help="replace a run already in OUT (without it or --resume, such an OUT is "
                        "refused)")
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


def _add_reproduce(sub, common) -> None:
    r = sub.add_parser(
        "reproduce", formatter_class=HelpFormatter, parents=[common],
        help="reproduce the paper's epoch-stability claims in the toy world (or on GSM8K)",
        description=_wrap(
            "Pretrain (or load) the toy world's base model, fine-tune it with PSFT, SFT (paper "
            "recipe, same schedule, PSFT's step size), SFT+KL and DFT over several seeds, evaluate "
            "every epoch, and write DIR/results.json, DIR/report.md, DIR/histories/, "
            "DIR/epoch_stability.png, DIR/tradeoff.png (and DIR/ablations.png)."),
        epilog=_examples("python -m minipsft reproduce --preset quick --out runs/quick",
                         "python -m minipsft reproduce --preset cpu --out runs/toy_cpu "
                         "--ablations refresh eps"))
    r.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="toy world: quick (a first look, 75 s on 2 cores), smoke (CI, ~1 min), "
                        "cpu (3 seeds, ~9 min on 2 cores), cpu_wide (cpu with a 4x larger "
                        "base, ~56 min with its pretraining), gpu (larger, one GPU); gsm8k: a "
                        "real model (--model) on GSM8K with TruthfulQA/ARC as OOD, one GPU "
                        "(default: cpu)")
    r.add_argument("--list-presets", action="store_true",
                   help="print every preset's settings and exit")
    _add_run_flags(r, required=False)
    r.add_argument("--ablations", nargs="*", default=[], choices=list(ABLATIONS),
                   help="also run these ablations (PSFT's refresh period; eps_high and no clip; "
                        "SFT warm-up; aggregation: PSFT, SFT and paper-recipe SFT with the "
                        "official run's loss aggregation and lr warm-up; frontier: every method "
                        "at 3-6 lrs; sawtooth: PSFT, SFT and paper-recipe SFT with held-out "
                        "entropy measured around every epoch boundary)")
    r.add_argument("--skip-main", action="store_true", help="run only the ablations")
    r.add_argument("--model", default=None,
                   help="gsm8k preset: hub id or folder of the model to fine-tune")
    r.add_argument("--data-dir", default=None,
                   help="gsm8k preset: local files instead of the hub (gsm8k_train.jsonl, "
                        "gsm8k_test.jsonl, truthfulqa_mc.jsonl, arc_challenge.jsonl in the hub "
                        "schemas)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help=_set_help(Preset, "--list-presets"))


ARM_NAMES = [a for a in ARMS if a != "sft_small"]  # sft_small needs psft and sft beside it


def _add_compare(sub, common) -> None:
    c = sub.add_parser(
        "compare", formatter_class=HelpFormatter, parents=[common],
        help="SFT vs PSFT on your own data and model (the files world)",
        description=_wrap(
            "Does PSFT help on my data? Fine-tune MODEL on TRAIN with PSFT, SFT at PSFT's lr and "
            "schedule, and SFT in the paper's recipe (one step per batch, a higher lr), over "
            "seeds, from the same model and in the same data order; after every epoch score "
            "exact match of the answer on TEST (greedy) and every OOD set. Writes the toy world's "
            "files: DIR/results.json, DIR/report.md, DIR/histories/, DIR/epoch_stability.png and "
            "DIR/tradeoff.png. Files: JSONL/Parquet in TRL's prompt-completion or messages "
            "format; an OOD set is multiple-choice JSONL (prompt, choices, label: scored by each "
            "choice's log-likelihood) or more such rows (exact match)."),
        epilog=_examples(
            "python -m minipsft compare --model Qwen/Qwen2.5-0.5B-Instruct --train train.jsonl "
            "\
      --test test.jsonl --ood arc=arc.jsonl --answer gsm8k --out runs/compare",
            "python -m minipsft compare --model ./my-model --train t.jsonl --test v.jsonl "
            "--arms psft sft sft_paper sft_kl dft \
      --answer 'Answer: (\\S+)' --epochs 2 "
            "--seeds 0 1 2 --out runs/mine"))
    c.add_argument("--model", required=True, help="hub id or folder of the model to fine-tune")
    c.add_argument("--train", required=True, help="training rows (.jsonl, .json or .parquet)")
    c.add_argument("--test", required=True,
                   help="held-out rows: the in-domain score is exact match of their answers")
    c.add_argument("--ood", nargs="*", default=[], metavar="NAME=PATH",
                   help="out-of-domain sets: multiple-choice JSONL or prompt/answer rows")
    c.add_argument("--answer", default="whole",
                   help="what exact match compares: 'whole' (the whole completion, stripped), "
                        "'gsm8k' (the number after ####, else the last number) or a regular "
                        "expression (its first group)")
    c.add_argument("--arms", nargs="+", default=list(PRESETS["files"].arms), choices=ARM_NAMES,
                   help="the methods compared (sft_kl and dft on request)")
    c.add_argument("--epochs", type=int, default=PRESETS["files"].epochs, help="epochs per run")
    c.add_argument("--lr", type=float, default=PRESETS["files"].lr,
                   help="PSFT's lr (and SFT's at PSFT's schedule)")
    c.add_argument("--sft-paper-lr", type=float, default=PRESETS["files"].sft_paper_lr,
                   help="the paper-recipe SFT's lr")
    _add_run_flags(c)
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help=_set_help(Preset, "python -m minipsft reproduce --list-presets, "
                                          "preset 'files'"))


def _add_across_bases(sub, common) -> None:
    b = sub.add_parser(
        "across-bases", formatter_class=HelpFormatter, parents=[common],
        help="the main comparison's verdicts over several independently pretrained bases",
        description=_wrap(
            "Read reproduce folders made with the same preset on bases pretrained with different "
            "seeds (--set pretrain_seed=N) and write OUT/across_bases.json and "
            "OUT/across_bases.md: OOD at matched ID per base and arm, its spread across bases, "
            "and PSFT's differences from paper-recipe SFT, SFT and SFT at PSFT's step size on "
            "each base with the rule that turns them into a verdict."),
        epilog=_examples("python -m minipsft reproduce --preset cpu --set pretrain_seed=1235 "
                         "--out runs/base1235",
                         "python -m minipsft across-bases results/toy_cpu runs/base1235 "
                         "runs/base1236 --out runs/bases"))
    b.add_argument("folders", nargs="+", help="results folders of 'reproduce'")
    b.add_argument("--out", required=True, help="output folder")


def _add_claims(sub, common) -> None:
    c = sub.add_parser(
        "claims", formatter_class=HelpFormatter, parents=[common],
        help="the paper's claims table, computed from the results folders",
        description=_wrap(
            "Compute every number and verdict of the claims table from the committed results "
            "folders under --results (toy_cpu, toy_cpu_ablations, toy_cpu_rl, toy_cpu_sawtooth, "
            "toy_cpu_bases and, for a second model size, toy_cpu_wide; a missing folder leaves "
            "its claims out), by the rule written beside each (claims.py), and write it as "
            "markdown."),
        epilog=_examples("python -m minipsft claims --results results --out results/claims.md"))
    c.add_argument("--results", default="results", help="the folder holding the results folders")
    c.add_argument("--out", default=None, help="markdown file to write (default: print it)")


def _add_reproduce_rl(sub, common) -> None:
    g = sub.add_parser(
        "reproduce-rl", formatter_class=HelpFormatter, parents=[common],
        help="GRPO from the base model and from the SFT and PSFT checkpoints (toy world)",
        description=_wrap(
            "Fine-tune the toy base with PSFT, SFT (paper recipe) and SFT (PSFT's lr) as "
            "'reproduce' does, keeping each run's best-ID epoch, then run the same GRPO stage from "
            "the base and from each checkpoint, evaluating ID/OOD accuracy and entropy along the "
            "way. Writes DIR/finetune/ (a reproduce folder), DIR/results.json, DIR/report.md, "
            "DIR/histories/ and DIR/rl_after_finetuning.png."),
        epilog=_examples("python -m minipsft reproduce-rl --preset smoke --out runs/rl_smoke",
                         "python -m minipsft reproduce-rl --preset cpu --out runs/rl_cpu "
                         "--set steps=100"))
    g.add_argument("--preset", choices=["smoke", "cpu", "gpu"], default="cpu",
                   help="smoke (<1 min, CI), cpu (3 seeds, ~15 min on 2 cores with the base model "
                        "cached), gpu (larger, one GPU) (default: cpu)")
    _add_run_flags(g)
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help=_set_help(RLPreset, "experiments.RL_PRESETS"))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also MINIPSFT_DEBUG=1)")
    parser = argparse.ArgumentParser(
        prog="python -m minipsft", formatter_class=HelpFormatter,
        description=_wrap("Proximal Supervised Fine-Tuning: fine-tune a causal LM (train), "
                          "reproduce the paper's claims in a toy world or on GSM8K (reproduce), "
                          "compare SFT and PSFT on your own data (compare), "
                          "RL after fine-tuning (reproduce-rl)."),
        epilog=_examples("python -m minipsft train --help",
                         "python -m minipsft compare --help",
                         "python -m minipsft reproduce --preset quick --out runs/quick"))
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub, common)
    _add_reproduce(sub, common)
    _add_compare(sub, common)
    _add_across_bases(sub, common)
    _add_claims(sub, common)
    _add_reproduce_rl(sub, common)
    return parser


def _number(value: str, kind):
    if kind in (str, str | None):
        return value
    if kind is tuple:  # e.g. ood_files=arc=a.jsonl,trivia=t.jsonl
        return tuple(part for part in value.split(",") if part)
    return int(value) if kind in (int, int | None) else float(value)


def _overrides(pairs, preset_class=None) -> dict:
    types = typing.get_type_hints(preset_class or Preset)
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types or key in _NOT_SETTABLE or not value:
            raise SystemExit(f"error: --set {pair!r}: use FIELD=VALUE with a number, true/false "
                             "or text field of "
                             f"{(preset_class or Preset).__name__}")
        kind = types[key]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise SystemExit(f"error: --set {pair!r}: {key} takes true or false")
            out[key] = value.lower() in ("true", "1", "yes")
        else:
            try:
                out[key] = _number(value, kind)
            except ValueError:
                raise SystemExit(f"error: --set {pair!r}: {key} takes a number") from None
    return out


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("MINIPSFT_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        run(args)
    except EXPECTED_ERRORS as e:
        if debug:
            raise
        sys.exit(f"error: {e}" + ("" if "\n" in str(e) else " (--debug shows the traceback)"))


def _list_presets() -> None:
    for name, preset in PRESETS.items():
        values = {k: v for k, v in dataclasses.asdict(preset).items() if k != "base"}
        base = "a given model (--model)"
        if preset.base is not None:
            base = dataclasses.asdict(preset.base)
        print(f"{name}:\n  base: {base}\n  " + ", ".join(f"{k}={v}" for k, v in values.items()))


def run(args) -> None:
    if args.command == "reproduce-rl":
        from .lab.experiments import reproduce_rl

        reproduce_rl(args.preset, args.out, cache_dir=args.cache, seeds=args.seeds,
                     workers=args.workers, device=args.device,
                     **_overrides(args.overrides, RLPreset))
        return
    if args.command == "claims":
        from .lab.claims import claims, claims_markdown

        table = claims_markdown(claims(args.results))
        if args.out:
            Path(args.out).write_text(table)
        print(table)
        return
    if args.command == "across-bases":
        from .lab.reports import across_bases, across_bases_report

        summary = across_bases(args.folders)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "across_bases.json").write_text(json.dumps(summary, indent=1))
        (out / "across_bases.md").write_text(across_bases_report(summary))
        print(across_bases_report(summary))
        return
    if args.command == "compare":
        from .lab.experiments import reproduce

        settings = dict(train_file=args.train, test_file=args.test, ood_files=tuple(args.ood),
                        answer=args.answer, arms=tuple(args.arms), epochs=args.epochs,
                        lr=args.lr, sft_paper_lr=args.sft_paper_lr)
        settings.update(_overrides(args.overrides))  # --set wins over the flags
        model = settings.pop("model", args.model)
        reproduce("files", args.out, cache_dir=args.cache, seeds=args.seeds,
                  workers=args.workers, device=args.device, model=model, **settings)
        return
    if args.command == "reproduce":
        from .lab.experiments import reproduce

        if args.list_presets:
            _list_presets()
            return
        if not args.out:
            raise ValueError("reproduce needs --out DIR (the results folder)")
        reproduce(args.preset, args.out, cache_dir=args.cache, seeds=args.seeds,
                  workers=args.workers, ablations=args.ablations, main=not args.skip_main,
                  device=args.device, model=args.model, data_dir=args.data_dir,
                  **_overrides(args.overrides))
        return
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
    examples = lm.encode(rows, max_length=args.max_length,
                         all_assistant_turns=args.all_assistant_turns)
    eval_fn = None
    if eval_rows:
        heldout = lm.encode(eval_rows, max_length=args.max_length,
                            all_assistant_turns=args.all_assistant_turns)
        eval_fn = lambda lm: heldout_eval(lm, heldout)  # noqa: E731
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
