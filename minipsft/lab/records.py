"""The lab's typed records: a ``Job`` is one fine-tuning run, an ``RLJob`` one GRPO run, a ``Run``
what either gave back, a ``Site`` where they run, a ``Folder`` a results folder read back. On disk
a results folder stays JSON (``results.py`` converts at that boundary)."""
from dataclasses import dataclass

from ..train import TrainConfig
from .presets import Preset, RLPreset


@dataclass(frozen=True)
class Site:
    """Where a job runs: the preset, the base model every run starts from, device and threads."""
    preset: Preset
    base_path: str
    device: str = "cpu"
    threads: int = 1


@dataclass(frozen=True)
class Job:
    """One fine-tuning run: ``arm`` at data seed ``seed``, in ``group`` (``main``, or an ablation)
    under ``setting`` (its label there); a job to run also has its ``config`` and ``site``."""
    arm: str
    seed: int
    group: str
    setting: str
    config: TrainConfig | None = None
    site: Site | None = None
    step_ratio: float | None = None  # sft_small: PSFT's weight drift over SFT's after epoch 1
    clip_analysis: bool = False  # count the tokens PSFT's clip stops (runner.ClippedTokens)
    save_best: str | None = None  # keep the best-ID epoch in save_best/ARM-sSEED/

    @property
    def name(self) -> str:
        """Its history file: ``GROUP-SETTING-sSEED``."""
        return f"{self.group}-{self.setting}-s{self.seed}".replace(" ", "_")

    @classmethod
    def of_record(cls, r: dict) -> "Job":
        return cls(r["method"], r["seed"], r["group"], r["setting"])


@dataclass(frozen=True)
class RLJob:
    """One GRPO run from ``start`` (``base``, or an arm's best-ID checkpoint at ``start_path``)."""
    start: str
    seed: int
    start_path: str = ""
    rl: RLPreset | None = None
    site: Site | None = None

    @property
    def name(self) -> str:
        """Its history file: ``START-sSEED``."""
        return f"{self.start}-s{self.seed}"

    @classmethod
    def of_record(cls, r: dict) -> "RLJob":
        return cls(r["start"], r["seed"])


@dataclass
class Run:
    """What a job gave back: its eval ``records`` (rows of results.json), its step ``history``, its
    time, and for fine-tuning the clipped-token counts and the best-ID checkpoint it kept."""
    job: Job | RLJob
    records: list
    history: list
    seconds: float = 0.0
    clipped_tokens: dict | None = None
    best: dict | None = None


@dataclass
class Folder:
    """A results folder read back; ``stage`` is ``Job`` (fine-tuning) or ``RLJob`` (RL stage)."""
    stage: type
    summary: dict
    records: list
    runs: list
