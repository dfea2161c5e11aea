"""Worlds: what an experiment fine-tunes and how it scores it.

A world gives the runner (``runner.py``, and the RL stage, ``rl_stage.py``) five things:

  ``base_model(cache_dir, device)``  the model every arm starts from: ``(path, how, pretrained)``
  ``train_rows(seed)``               the demonstrations (rows in TRL's formats) for one data seed
  ``evaluator(base)``                a callable ``lm -> {"id_acc", "ood_acc", "entropy", ...}``
  ``reward(row, completion)``        the RL stage's verifiable reward, its ``rl_prompts(n, seed)``
                                     and ``max_new_tokens()`` per sample
  ``words``                          what its report and figures call things (``Words``)

Four worlds: ``toy`` (a tiny model pretrained here, ``toy.py``), ``gsm8k`` (a hub model on GSM8K,
TruthfulQA MC1 and ARC-Challenge, ``real.py``), ``handmade`` (a real model, SmolLM2-135M from a
package by default, on tasks written for the project, ``handmade.py``) and ``files`` (the user's
own train/test files and model, exact match of the answer, optional OOD sets). A new task is one
more class here plus its entry in ``WORLDS``.
"""
import re
import statistics
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from . import handmade, real, toy
from .toy import ID_TASK
from ..data import load_rows, read_json_rows
from ..errors import DataError
from ..logprobs import heldout_eval

__all__ = ["Words", "WORLDS", "make_world", "answer_extractor", "load_choice_items",
           "world_words", "ToyWorld", "GSM8KWorld", "FilesWorld", "HandmadeWorld"]


@dataclass
class Words:
    """How a world's report and figures name things. ``metrics``: eval key -> panel title, in the
    order drawn (a metric with no data in a results folder is not drawn); ``columns``: the report's
    per-epoch table; with ``per_set``, every OOD set (``ood_<name>``) gets a panel and a column."""
    title: str  # completes "SFT vs PSFT across epochs ...": "in the toy world", "on GSM8K"
    id_name: str  # what in-domain means here, for axis labels
    ood_name: str
    metrics: dict = field(default_factory=dict)
    columns: tuple = ("id_acc", "ood_acc", "entropy", "heldout_nll")
    per_set: bool = True


ENTROPY = {"entropy": "Entropy of held-out demonstrations (nats)"}


# ------------------------------------------------------------------------------------------- toy
class ToyWorld:
    """The synthetic world (``toy.py``): a base pretrained here, letter reversals in domain, its
    prior tasks out of domain."""

    words = Words(
        title="in the toy world", id_name="8-11 letter reversals", ood_name="prior tasks",
        metrics={"id_acc": "In-domain accuracy (held-out 8-11 letter reversals)",
                 "ood_acc": "Out-of-domain accuracy (prior tasks)",
                 "sample_entropy": "Entropy on the model's own samples (ID prompts)",
                 "ood_format": "Format instructions followed (IFEval analogue)",
                 "ood_kl": "KL(model || base) on OOD demonstrations"},
        columns=("id_acc", "ood_acc", "ood_format", "entropy", "sample_entropy", "ood_kl", "drift"),
        per_set=False)
    dtype = "float32"  # the toy runs in float32 on any device

    @classmethod
    def words_for(cls, config: dict) -> Words:
        """The words of a folder's task: the second in-domain task (sorting) renames the ID."""
        if config.get("id_task", ID_TASK) == ID_TASK:
            return cls.words
        return replace(cls.words, title="in the toy world, sorting", id_name="7-10 letter sorts",
                       metrics=cls.words.metrics | {
                           "id_acc": "In-domain accuracy (held-out 7-10 letter sorts)"})

    def __init__(self, p):
        if p.id_task not in toy.ID_TASKS:
            raise ValueError(f"id_task {p.id_task!r}: the toy world's in-domain tasks are "
                             f"{', '.join(toy.ID_TASKS)}")
        self.p = p

    def base_model(self, cache_dir, device) -> tuple:
        config = self.p.base
        if self.p.pretrain_seed is not None:  # another draw of the base: its data sample and init
            config = replace(config, pretrain_seed=self.p.pretrain_seed)
        base, path, cached = toy.pretrained_base(config, cache_dir, device=device)
        how = "pretrained now"
        if cached:
            how = "shipped with the package" if toy.SHIPPED_BASES in path.parents else "cached"
        return path, f"{how}, {base.model.num_parameters() / 1e6:.2f}M parameters", not cached

    def id_rows(self, n: int, seed: int) -> list:
        """``n`` demonstrations of the preset's in-domain task (``id_task``) from ``seed``."""
        return toy.id_rows(n, seed, self.p.id_task)

    def train_rows(self, seed: int) -> list:
        """The demonstrations; with ``replay``, prior-task ones after them (the loop shuffles)."""
        replay = toy.replay_rows(round(self.p.n_train * self.p.replay), seed=30_000 + seed)
        return self.id_rows(self.p.n_train, seed=10_000 + seed) + replay

    def evaluator(self, base):
        return toy.Evaluator(base, self.id_rows(self.p.n_id_eval, seed=1),
                             toy.ood_rows(self.p.ood_per_task, seed=2), n_samples=self.p.n_samples)

    def max_new_tokens(self) -> int:
        """As the evaluator's (``toy.Evaluator.id_tokens``): the longest held-out ID answer."""
        return toy.answer_tokens(self.id_rows(self.p.n_id_eval, seed=1))

    def reward(self, row: dict, completion: str) -> float:
        """1.0 when the toy checker accepts the answer (the reflection tail is ignored)."""
        return float(toy.is_correct(row, completion))

    def rl_prompts(self, n: int, seed: int) -> list:
        return self.id_rows(n, seed=20_000 + seed)  # ID prompts never used in fine-tuning


class _GivenModel:
    """A world that fine-tunes a given model (``p.model``, a hub id or folder) in its own dtype."""
    dtype = None

    def base_model(self, cache_dir, device) -> tuple:
        return self.p.model, "given", False

    def max_new_tokens(self) -> int:
        return self.p.max_new_tokens

    def reward(self, row: dict, completion: str) -> float:  # the number after ####, exactly
        return real.gsm8k_reward(row, completion)


# ------------------------------------------------------------------------------------------- GSM8K
class GSM8KWorld(_GivenModel):
    """A hub (or local) model on GSM8K, with TruthfulQA MC1 and ARC-Challenge out of domain
    (``real.py``); the data from the hub or from ``p.data_dir``."""

    words = Words(title="on GSM8K", id_name="GSM8K", ood_name="TruthfulQA MC1 and ARC-Challenge",
                  metrics={"id_acc": "In-domain: GSM8K exact match (greedy)",
                           "ood_acc": "Out-of-domain: mean of TruthfulQA and ARC", **ENTROPY})

    def __init__(self, p):
        if not p.model:
            raise ValueError("the gsm8k world fine-tunes a given model: pass --model (hub id or "
                             "folder)")
        self.p = p

    @cached_property
    def data(self) -> dict:
        p = self.p
        return real.world_data(p.n_train, p.n_id_eval, p.ood_per_task, p.data_dir)

    def train_rows(self, seed: int) -> list:
        return self.data["train"]  # the seed changes the data order only

    def evaluator(self, base):
        d = self.data
        return real.Evaluator(base, d["test"], d["ood"], self.p.max_new_tokens, self.p.max_length)

    def rl_prompts(self, n: int, seed: int) -> list:
        return self.data["train"][:n]


# ------------------------------------------------------------------------------------------- files
def answer_extractor(answer: str):
    """``text -> str | None``: what exact match compares. ``whole``: the whole text, stripped;
    ``gsm8k``: GSM8K's final answer (``real.extract_answer``); anything else: a regular expression
    whose first group (or whole match) is the answer, None when it does not match."""
    if answer == "whole":
        return lambda text: text.strip()
    if answer == "gsm8k":
        return real.extract_answer
    try:
        pattern = re.compile(answer)
    except re.error as e:
        raise ValueError(f"answer={answer!r}: not 'whole', 'gsm8k' or a valid regular "
                         f"expression ({e})") from None

    def extract(text):
        match = pattern.search(text)
        found = None if match is None else match.group(1 if pattern.groups else 0)
        return None if found is None else found.strip()  # an optional group may match nothing
    return extract


def _prompt_and_reference(row: dict) -> tuple:
    """A row in TRL's formats -> (prompt, reference completion text)."""
    if row.get("messages") is not None:
        return row["messages"][:-1], row["messages"][-1]["content"]
    completion = row["completion"]
    if not isinstance(completion, str):  # conversational prompt-completion
        completion = completion[-1]["content"]
    return row["prompt"], completion


def load_choice_items(path) -> list:
    """Multiple-choice rows (``prompt``, ``choices``, ``label``) from a JSONL file, checked row by
    row (the row numbers are the file's line numbers)."""
    rows, problems = read_json_rows(Path(path)), []
    for i, r in enumerate(rows, start=1):
        choices = r.get("choices")
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            problems.append(f"row {i}: field 'prompt' must be a non-empty string")
        elif not isinstance(choices, list) or len(choices) < 2 or \
                not all(isinstance(c, str) and c.strip() for c in choices):
            problems.append(f"row {i}: field 'choices' must be a list of 2 or more non-empty "
                            f"strings")
        elif not isinstance(r.get("label"), int) or not 0 <= r["label"] < len(choices):
            problems.append(f"row {i}: field 'label' must be the index of the right choice "
                            f"(0..{len(choices) - 1}), found {r.get('label')!r}")
    if problems:
        raise DataError.listing(f"{path}: {len(problems)} bad row(s)", problems)
    return rows


def _is_choice_file(path) -> bool:
    """Whether a JSONL OOD set is multiple choice (its first row has ``choices``); other formats
    are read as prompt/answer rows by ``load_rows``."""
    return (Path(path).suffix.lower() == ".jsonl" and Path(path).is_file()
            and "choices" in read_json_rows(Path(path))[0])


class FilesWorld(_GivenModel):
    """The user's own data: training rows and held-out test rows in TRL's formats (prompt-completion
    or messages), scored by exact match of the answer (``answer_extractor``); OOD sets given as
    ``name=path``, each multiple-choice JSONL (``prompt``, ``choices``, ``label``; scored by the
    summed log-likelihood of each choice, as ``real.mc_accuracy``) or more prompt/answer rows
    (exact match); any hub id or local folder as the model; ``n_*`` = 0 keeps every row."""

    def __init__(self, p):
        if not p.model or not p.train_file or not p.test_file:
            raise ValueError("the files world needs a model, a training file and a test file "
                             "(--model, --train, --test)")
        self.p = p
        self.extract = answer_extractor(p.answer)
        self.train = load_rows(p.train_file)[:p.n_train or None]
        self.test = load_rows(p.test_file)[:p.n_id_eval or None]
        for i, row in enumerate(self.test, start=1):  # a regex that misses scores 0 silently
            if self.extract(_prompt_and_reference(row)[1]) is None:
                raise DataError(f"{p.test_file}: row {i}: answer={p.answer!r} finds no answer in "
                                "the reference completion")
        self.ood_choice, self.ood_exact = {}, {}
        for spec in p.ood_files:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"OOD set {spec!r}: expected NAME=PATH")
            if name == "acc" or name in self.ood_choice or name in self.ood_exact:
                raise ValueError(f"OOD set {spec!r}: the name {name!r} is taken (names must differ"
                                 " from each other and from 'acc')")
            if _is_choice_file(path):
                self.ood_choice[name] = load_choice_items(path)[:p.ood_per_task or None]
            else:
                self.ood_exact[name] = load_rows(path)[:p.ood_per_task or None]
        self.words = FilesWorld.words_for(vars(p))

    @staticmethod
    def words_for(config: dict) -> Words:
        names = [spec.partition("=")[0] for spec in config.get("ood_files") or ()]
        test = Path(config.get("test_file") or "test").name
        train = Path(config.get("train_file") or "train").name
        return Words(title=f"on {train}", id_name=test,
                     ood_name=", ".join(names) or "none",
                     metrics={"id_acc": f"In-domain: exact match on {test} (greedy)",
                              "ood_acc": f"Out-of-domain: mean of {', '.join(names)}", **ENTROPY})

    def train_rows(self, seed: int) -> list:
        return self.train  # the seed changes the data order only

    def matches(self, text: str, reference: str) -> bool:
        """Whether ``text`` has an answer and it is the reference's."""
        answer = self.extract(text)
        return answer is not None and answer == self.extract(reference)

    def exact_match(self, lm, rows: list) -> float:
        prompts, references = zip(*(_prompt_and_reference(r) for r in rows))
        outputs = lm.generate(list(prompts), max_new_tokens=self.p.max_new_tokens, batch_size=32)
        return sum(map(self.matches, outputs, references)) / len(rows)

    def evaluator(self, base):
        heldout = base.encode(self.test, max_length=self.p.max_length)

        def evaluate(lm) -> dict:
            out = {"id_acc": self.exact_match(lm, self.test)}
            for name, items in self.ood_choice.items():
                out[f"ood_{name}"] = real.mc_accuracy(lm, items)
            for name, rows in self.ood_exact.items():
                out[f"ood_{name}"] = self.exact_match(lm, rows)
            names = [*self.ood_choice, *self.ood_exact]
            if names:
                out["ood_acc"] = sum(out[f"ood_{n}"] for n in names) / len(names)
            held = heldout_eval(lm, heldout)
            out["heldout_nll"], out["entropy"] = held["heldout_nll"], held["heldout_entropy"]
            return out
        return evaluate

    def reward(self, row: dict, completion: str) -> float:
        """1.0 when the extracted answer equals the reference's exactly, else 0.0."""
        return float(self.matches(completion, _prompt_and_reference(row)[1]))

    def rl_prompts(self, n: int, seed: int) -> list:
        return self.train[:n]


# ------------------------------------------------------------------------ handmade (no download)
class HandmadeWorld(_GivenModel):
    """A real model (``p.model``; the packaged SmolLM2-135M-Instruct by default) on tasks written
    for the project (``handmade.py``): two-step word problems in domain (GSM8K's style, exact
    match of ``#### N``); out of domain a knowledge multiple-choice set (``acc`` and the harness's
    ``acc_norm``) and instructions with exact checks, whose mean is ``ood_acc``."""

    words = Words(title="on handmade word problems", id_name="word problems",
                  ood_name="knowledge MC and instructions",
                  metrics={"id_acc": "In-domain: word problems, exact match (greedy)",
                           "ood_acc": "Out-of-domain: mean of knowledge and instructions",
                           "ood_knowledge": "Knowledge multiple choice (acc)",
                           "ood_instructions": "Instructions followed (IFEval analogue)",
                           **ENTROPY},
                  columns=("id_acc", "ood_acc", "ood_knowledge", "ood_knowledge_norm",
                           "ood_instructions", "entropy"), per_set=False)
    base_scores = {}  # the base's evaluation, the same for every arm and seed: made once

    def __init__(self, p):
        self.p = p
        self.test = handmade.word_problems(p.n_id_eval, seed=1, instruction=real.INSTRUCTION)
        self.instructions = handmade.instruction_rows()

    def train_rows(self, seed: int) -> list:  # the seed changes the data order only
        return handmade.word_problems(self.p.n_train, seed=0, instruction=real.INSTRUCTION)

    def evaluate(self, lm, heldout) -> dict:
        out = {"id_acc": real.gsm8k_accuracy(lm, self.test, self.p.max_new_tokens)}
        out["ood_knowledge"], out["ood_knowledge_norm"] = real.mc_scores(
            lm, handmade.knowledge_items()[:self.p.ood_per_task or None])
        replies = lm.generate([r["prompt"] for r in self.instructions], max_new_tokens=48)
        out["ood_instructions"] = statistics.fmean(
            map(handmade.follows_instruction, self.instructions, replies))
        out["ood_acc"] = (out["ood_knowledge"] + out["ood_instructions"]) / 2
        held = heldout_eval(lm, heldout)
        out["heldout_nll"], out["entropy"] = held["heldout_nll"], held["heldout_entropy"]
        return out

    def evaluator(self, base):
        heldout, calls = base.encode(self.test, max_length=self.p.max_length), []
        base_name = base.hf_model.name_or_path  # a name, not the model: the caller may free it
        key = (base_name, str(base.device), str(base.model.dtype), self.p.n_id_eval,
               self.p.ood_per_task, self.p.max_new_tokens, self.p.max_length)

        def evaluate(lm) -> dict:
            calls.append(1)
            untouched = len(calls) == 1 and lm.hf_model.name_or_path == base_name
            if not untouched:  # trained, or another start (an RL stage's checkpoint)
                return self.evaluate(lm, heldout)
            if key not in self.base_scores:  # the untouched base, scored once per process
                self.base_scores[key] = self.evaluate(lm, heldout)
            return dict(self.base_scores[key])
        return evaluate

    def rl_prompts(self, n: int, seed: int) -> list:
        return handmade.word_problems(n, seed=20_000 + seed, instruction=real.INSTRUCTION)


WORLDS = {"toy": ToyWorld, "gsm8k": GSM8KWorld, "files": FilesWorld, "handmade": HandmadeWorld}


def make_world(p):
    """The world a preset names (``p.world``), set up with the preset's sizes and files."""
    if p.world not in WORLDS:
        raise ValueError(f"world {p.world!r}: choose one of {', '.join(WORLDS)}")
    return WORLDS[p.world](p)


def world_words(config: dict) -> Words:
    """A world's words from a results folder's ``preset_config``, without loading any data."""
    cls = WORLDS[config.get("world", "toy")]
    return cls.words_for(config) if cls in (FilesWorld, ToyWorld) else cls.words
