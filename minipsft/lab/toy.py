"""The toy world: a CPU-sized miniature of the paper's setting, with real mechanisms.

Design (each piece is there because the paper's effects depend on it):

* **Prior capabilities.** A tiny Llama-style model is pretrained from scratch on six tasks
  (``add``/``sub``/``max`` of 1- and 2-digit numbers, ``rev``erse a 3-6 letter word, ``sort`` a
  string, ``pick`` any letter of a word) plus some 7-9 letter reversals answered directly; the six
  tasks' held-out accuracy is the OOD score (the analogue of the paper's general benchmarks).
* **Instructions and format.** 30% of pretraining prompts end in ``()``, asking for the answer in
  parentheses: the analogue of IFEval's format instructions, scored as ``ood_format``.
* **A stochastic teacher.** Two answer styles (``82`` or ``it is 82``) and several right ``pick``
  answers: the true conditional entropy is above zero, so entropy collapse is measurable.
* **An off-policy in-domain task.** Reversals of 8-11 letter words (``rev szycidpq:``), which the
  base does only partly (it saw 7-9 letters), demonstrated in a style it never saw: the answer, then
  a "reflection" (``qpdicyzs;wait 8 letters ok``, two words drawn at random) like a stronger model's
  "wait". The shared style tokens rise fast and can bleed into the prior tasks (``(ab);hmm 2
  letters ok`` breaks a ``()`` answer), as fine-tuning erodes prior skills in the paper. (A
  preamble *before* the answer broke the base's position-based reversal: no arm learned the task.)
* **A second in-domain task** (``id_task="sort_long"``): sorting 7-10 letters (pretraining sorted
  3-6), another operation in the same reflection style, so that a verdict can be checked over
  (base, task) pairs instead of one task (its OOD set holds the shorter sorts, as the reversals'
  holds the shorter reversals: that part of OOD measures transfer too).
* **Finite data revisited.** A fixed set of demonstrations trained on for several epochs, so
  memorising it (and its random style choices) is possible, as in multi-epoch SFT.

Answers are scored without the reflection tail, so a change of style alone is not an error.
Everything comes from seeds; the tokenizer (``char_tokenizer``) is saved with the model.
"""
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..char_tokenizer import char_tokenizer
from ..model import CausalLM
from ..runs import Progress
from ..logprobs import heldout_eval
from ..train import TrainConfig, train

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +=;:()"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
PRIOR_TASKS = ("add", "sub", "max", "rev", "sort", "pick")
ID_TASK = "rev_long"
# the in-domain tasks, each longer than anything pretraining showed, in the reflection style:
# reversals of 8-11 letters (the base does the shorter ones: it saw 7-9) and, a second task of
# another operation, sorting 7-10 letters (the base sorted only 3-6)
ID_TASKS = (ID_TASK, "sort_long")
# the ID teacher's random reflection words: entropy above zero there
OPENERS = ("wait", "check", "hmm")
CONNECTIVES = ("ok", "good")
# word lengths to reverse: the prior task, the ID task, and pretraining's partial skill of it
REVERSALS = {"rev": (3, 6), "rev_long": (8, 11), "rev_pretrain": (7, 9)}
SORTS = {"sort": (3, 6), "sort_long": (7, 10)}  # string lengths to sort


# ------------------------------------------------------------------------------------------- tasks
def _small(rng: random.Random) -> int:
    return rng.randrange(10) if rng.random() < 0.5 else rng.randrange(10, 100)


def _task(name: str, rng: random.Random):
    """(prompt body, set of right answers) for one instance of a task."""
    if name == "add":
        a, b = _small(rng), _small(rng)
        return f"add {a} {b}", {str(a + b)}
    if name in REVERSALS:
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*REVERSALS[name])))
        return f"rev {w}", {w[::-1]}
    if name == "sub":
        a, b = sorted((_small(rng), _small(rng)), reverse=True)
        return f"sub {a} {b}", {str(a - b)}
    if name == "max":
        xs = [rng.randrange(100) for _ in range(rng.randint(3, 4))]
        return "max " + " ".join(map(str, xs)), {str(max(xs))}
    if name in SORTS:
        w = "".join(rng.choice(LETTERS[:10]) for _ in range(rng.randint(*SORTS[name])))
        return f"sort {w}", {"".join(sorted(w))}
    if name == "pick":
        w = "".join(rng.sample(LETTERS, rng.randint(3, 5)))
        return f"pick {w}", set(w)
    raise ValueError(f"unknown task {name!r}")


def _styled(answer: str, paren: bool, rng: random.Random) -> str:
    text = answer if rng.random() < 0.75 else f"it is {answer}"
    return f"({text})" if paren else text


def prior_row(name: str, rng: random.Random, paren_rate: float = 0.3) -> dict:
    """One pretraining demonstration of a prior task, in the teacher's (stochastic) style."""
    body, answers = _task(name, rng)
    paren = rng.random() < paren_rate
    return {"prompt": body + (" ()" if paren else "") + ":",
            "completion": _styled(rng.choice(sorted(answers)), paren, rng),
            "task": name, "answers": sorted(answers), "paren": paren}


def chain_of_thought(word: str, rng: random.Random, answer: str | None = None) -> str:
    """The ID teacher's style: the answer (``word`` reversed by default), then a "reflection"
    (``qpdicyzs;wait 8 letters ok``)."""
    answer = word[::-1] if answer is None else answer
    return f"{answer};{rng.choice(OPENERS)} {len(word)} letters {rng.choice(CONNECTIVES)}"


def completion_roles(text: str) -> list:
    """Each character's role in an ID demonstration: ``content`` (answer, count) or ``format``;
    one without a reflection (a prior task's, mixed in by ``replay_rows``) is all content."""
    answer, semicolon, reflection = text.partition(";")
    return (["content"] * len(answer) + (["format"] if semicolon else [])
            + ["content" if c.isdigit() else "format" for c in reflection])


def id_row(rng: random.Random, task: str = ID_TASK) -> dict:
    """An in-domain demonstration (``task`` one of ``ID_TASKS``), or pretraining's direct answer."""
    body, answers = _task(task, rng)
    completion = (chain_of_thought(body.split()[1], rng, min(answers)) if task in ID_TASKS
                  else _styled(next(iter(answers)), False, rng))
    return {"prompt": body + ":", "completion": completion,
            "task": task if task in ID_TASKS else ID_TASK, "answers": sorted(answers),
            "paren": False}


def id_direct_row(rng: random.Random) -> dict:
    """A 7-9 letter reversal answered directly (5% of pretraining): the base can do the shorter half
    of the ID task (8-11 letters) and fails the longer half, so it starts with some ID skill."""
    return id_row(rng, "rev_pretrain")


def pretrain_rows(n: int, seed: int, id_direct_rate: float = 0.05) -> list:
    rng = random.Random(seed)
    return [id_direct_row(rng) if rng.random() < id_direct_rate
            else prior_row(rng.choice(PRIOR_TASKS), rng) for _ in range(n)]


def id_rows(n: int, seed: int, task: str = ID_TASK) -> list:
    rng = random.Random(seed)
    return [id_row(rng, task) for _ in range(n)]


def replay_rows(n: int, seed: int) -> list:
    """Prior-task demonstrations in pretraining's style, to mix into the fine-tuning data: what
    keeps forgetting mild in practice (instruction data mixed with the new task's). The tasks'
    inputs are few (1-digit sums, short words), so some equal held-out OOD prompts: OOD under
    replay partly measures recall of items trained on, as pretraining's own draws do."""
    rng = random.Random(seed)
    return [prior_row(rng.choice(PRIOR_TASKS), rng) for _ in range(n)]


def ood_rows(per_task: int, seed: int) -> list:
    """Held-out prompts of every prior task, with and without the ``()`` instruction."""
    rng = random.Random(seed)
    return [prior_row(name, rng, paren_rate=float(paren))
            for name in PRIOR_TASKS for paren in (False, True) for _ in range(per_task)]


_NUMBER = re.compile(r"\d+")


def is_correct(row: dict, output: str) -> bool:
    """Check a generated answer, reflection tail ignored: numeric tasks by the last number, others
    with an optional ``it is``; ``()`` prompts need the parentheses around it all."""
    text = output.strip()
    if row["paren"]:
        if not (text.startswith("(") and text.endswith(")")):
            return False
        text = text[1:-1].strip()
    text = text.split(";", 1)[0]  # drop a reflection tail (no answer contains ";")
    if row["task"] in ("add", "sub", "max"):
        numbers = _NUMBER.findall(text)
        return bool(numbers) and numbers[-1] in row["answers"]
    return text.removeprefix("it is ").strip() in row["answers"]


# ------------------------------------------------------------------------------------------- model
@dataclass
class BaseConfig:
    """The base model and its pretraining. Its hash names the cache folder."""
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    pretrain_rows: int = 160_000
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    pretrain_seed: int = 1234
    max_position: int = 96

    def key(self) -> str:
        """Hash of the settings, alphabet and a data sample: new tasks invalidate the cache."""
        world = {"config": asdict(self), "alphabet": ALPHABET,
                 "sample": pretrain_rows(500, self.pretrain_seed)}
        return hashlib.sha1(json.dumps(world, sort_keys=True).encode()).hexdigest()[:12]


def new_model(cfg: BaseConfig, device="cpu") -> CausalLM:
    from transformers import LlamaConfig

    tok = char_tokenizer(ALPHABET)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden,
                         intermediate_size=3 * cfg.hidden, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=cfg.max_position, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    return CausalLM.from_config(config, tok, seed=cfg.pretrain_seed, device=device, dtype="float32")


# Bases shipped with the package (the cpu preset's, ~3.5 MB), so that a first run needs no
# pretraining; pretrained here on 2 CPU threads by pretrained_base itself (see bases/README.md).
SHIPPED_BASES = Path(__file__).parent / "bases"


def pretrained_base(cfg: BaseConfig, cache_dir, progress: bool = True, device="cpu",
                    shipped: bool = True) -> tuple:
    """``(CausalLM, path, loaded_not_pretrained)``: the base from ``cache_dir/base-<hash>`` or the
    ``shipped`` bases, else pretrained (deterministic per thread count) and saved. Never
    half-written: saved into a temporary folder, its mark (``base_config.json``) last, then renamed
    into place (of two processes, the first wins); a folder without the mark is ignored."""
    path = Path(cache_dir) / f"base-{cfg.key()}"
    for folder in (path, SHIPPED_BASES / path.name) if shipped else (path,):
        if (folder / "base_config.json").exists():
            return CausalLM.from_pretrained(folder, device=device, dtype="float32"), folder, True
    if path.exists():
        warnings.warn(f"ignoring {path}: it has no base_config.json (a pretraining that did not "
                      "finish); pretraining the base again")
        shutil.rmtree(path, ignore_errors=True)
    lm = new_model(cfg, device)
    examples = lm.encode(pretrain_rows(cfg.pretrain_rows, cfg.pretrain_seed))
    steps = len(examples) // cfg.pretrain_batch
    train(lm, examples,
          TrainConfig(method="sft", epochs=1, lr=cfg.pretrain_lr, batch_size=cfg.pretrain_batch,
                      minibatch_size=cfg.pretrain_batch, lr_warmup_steps=max(1, steps // 20),
                      lr_schedule="cosine", weight_decay=0.1, seed=cfg.pretrain_seed,
                      progress=progress), run=Progress())
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    lm.save_pretrained(tmp)
    (tmp / "base_config.json").write_text(json.dumps(asdict(cfg), indent=2))  # the mark, last
    try:
        os.rename(tmp, path)
    except OSError:  # another process renamed its copy first: the same weights, keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return lm, path, False


# -------------------------------------------------------------------------------------- evaluation
def generate_accuracy(lm, rows, max_new_tokens: int) -> list:
    outputs = lm.generate([r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                          batch_size=256)
    return [is_correct(r, o) for r, o in zip(rows, outputs)]


@torch.no_grad()
def mean_kl(lm, base_model, examples, batch_size: int = 128) -> float:
    """Exact per-token KL(pi || pi_base) over the vocabulary, averaged over completion tokens."""
    total = n = 0.0
    for s in range(0, len(examples), batch_size):
        batch = lm.collate(examples[s:s + batch_size])
        ids, attn = batch["input_ids"], batch["attention_mask"]
        lp = lm.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float().log_softmax(-1)
        lq = base_model(input_ids=ids, attention_mask=attn).logits[:, :-1].float().log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        m = batch["completion_mask"][:, 1:].float()
        total, n = total + (kl * m).sum().item(), n + m.sum().item()
    return total / n


@torch.no_grad()
def param_distance(model, base_model) -> float:
    """||theta - theta_base|| / ||theta_base||: how far fine-tuning moved the weights."""
    diff = sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), base_model.parameters()))
    norm = sum((q ** 2).sum() for q in base_model.parameters())
    return (diff / norm).sqrt().item()


def answer_tokens(rows) -> int:
    """How many tokens a generation may take: the longest answer (a token a character) + 4."""
    return max(len(r["completion"]) for r in rows) + 4


class Evaluator:
    """Each evaluation: ID/OOD accuracy (greedy), held-out NLL/entropy, the entropy of the model's
    samples, KL from the base on OOD demonstrations and weight distance from it (``drift``)."""

    def __init__(self, base: CausalLM, id_eval: list, ood_eval: list, n_samples: int = 128):
        self.id_eval, self.ood_eval = id_eval, ood_eval
        self.base_model = base.frozen_copy()
        self.id_examples = base.encode(id_eval)
        self.ood_examples = base.encode(ood_eval)
        self.sample_prompts = [r["prompt"] for r in id_eval[:n_samples]]
        self.id_tokens = answer_tokens(id_eval)

    def __call__(self, lm) -> dict:
        id_ok = generate_accuracy(lm, self.id_eval, self.id_tokens)
        ood_ok = generate_accuracy(lm, self.ood_eval, self.id_tokens)
        out = {"id_acc": sum(id_ok) / len(id_ok), "ood_acc": sum(ood_ok) / len(ood_ok)}
        for name in PRIOR_TASKS:
            hits = [ok for ok, r in zip(ood_ok, self.ood_eval) if r["task"] == name]
            out[f"ood_{name}"] = sum(hits) / len(hits)
        fmt = [ok for ok, r in zip(ood_ok, self.ood_eval) if r["paren"]]
        out["ood_format"] = sum(fmt) / len(fmt)
        held = heldout_eval(lm, self.id_examples)
        out["heldout_nll"], out["entropy"] = held["heldout_nll"], held["heldout_entropy"]
        with torch.random.fork_rng(devices=[]):  # the same sampling noise each time, restored after
            torch.manual_seed(0)
            samples = lm.generate(self.sample_prompts, max_new_tokens=self.id_tokens,
                                  do_sample=True, batch_size=256)
        sampled = lm.encode([{"prompt": p, "completion": c}
                             for p, c in zip(self.sample_prompts, samples)])
        out["sample_entropy"] = heldout_eval(lm, sampled)["heldout_entropy"]
        out["ood_kl"] = mean_kl(lm, self.base_model, self.ood_examples)
        out["drift"] = param_distance(lm.model, self.base_model)
        return out
