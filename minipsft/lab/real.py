"""Real data sets for a hub model on one GPU: GSM8K in domain, multiple-choice benchmarks
out of domain.

* GSM8K (``openai/gsm8k``, config ``main``): question -> user message, worked answer -> assistant
  message (the calculator notes ``<<48/2=24>>`` removed), trained through the model's chat template.
  Accuracy: exact match of the final answer, taken from ``#### N``, else ``\\boxed{N}``, else the
  last number of the generation.
* TruthfulQA MC1 (``truthfulqa/truthful_qa``, ``multiple_choice``) and ARC-Challenge
  (``allenai/ai2_arc``, ``ARC-Challenge``): scored without generation, by the summed log-likelihood
  of each choice after the question (as lm-evaluation-harness's ``acc``); accuracy = how often the
  right choice scores highest.

Every loader takes ``path=`` (a local .jsonl/.parquet file in the hub schema) instead of the hub,
so tests and offline users run the same code on fixture files.
"""
import re

import torch

from ..logprobs import heldout_eval

__all__ = ["load_split", "gsm8k_rows", "extract_answer", "gsm8k_accuracy", "truthfulqa_items",
           "arc_items", "choice_logprobs", "mc_accuracy"]


def load_split(name: str, config: str | None, split: str, path=None, n: int | None = None) -> list:
    """Rows of a hub data set split (``datasets.load_dataset``) or of a local file in its schema;
    the first ``n`` rows when ``n`` is given."""
    import datasets

    if path is not None:
        kind = "parquet" if str(path).endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        ds = datasets.load_dataset(name, config, split=split)
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    return ds.to_list()


# ------------------------------------------------------------------------------------------- GSM8K
_CALC = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
INSTRUCTION = "Solve the problem step by step. End with the final answer after '####'."


def _clean_number(text: str) -> str | None:
    match = _NUMBER.findall(text)
    if not match:
        return None
    value = match[-1].replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K solution or generation, normalised (no commas, no
    trailing ``.0``): after the last ``####``, else in the last ``\\boxed{}``, else the last
    number."""
    if "####" in text:
        return _clean_number(text.rsplit("####", 1)[1])
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return _clean_number(boxed[-1])
    return _clean_number(text)


def gsm8k_rows(raw: list) -> list:
    """GSM8K rows (``question``, ``answer``) -> conversational rows with the reference ``final``."""
    rows = []
    for i, r in enumerate(raw, start=1):
        if not r.get("question") or not r.get("answer") or "####" not in r["answer"]:
            raise ValueError(f"GSM8K row {i}: needs 'question' and an 'answer' ending in '#### N'")
        solution = _CALC.sub("", r["answer"]).strip()
        rows.append({"messages": [{"role": "user",
                                   "content": f"{r['question'].strip()}\n{INSTRUCTION}"},
                                  {"role": "assistant", "content": solution}],
                     "final": extract_answer(solution)})
    return rows


def gsm8k_accuracy(lm, rows: list, max_new_tokens: int = 320, batch_size: int = 32) -> float:
    """Greedy exact-match accuracy of the final answers."""
    outputs = lm.generate([r["messages"][:-1] for r in rows], max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
    return sum(extract_answer(o) == r["final"] for o, r in zip(outputs, rows)) / len(rows)


def gsm8k_reward(row: dict, completion: str) -> float:
    """GRPO's verifiable reward on ``gsm8k_rows``: 1.0 for the exact final answer, else 0.0."""
    return float(extract_answer(completion) == row["final"])


# --------------------------------------------------------------------------------- multiple choice
def truthfulqa_items(raw: list) -> list:
    """TruthfulQA ``multiple_choice`` rows -> MC1 items ``{"prompt", "choices", "label"}``."""
    return [{"prompt": f"Q: {r['question']}\nA:", "choices": list(r["mc1_targets"]["choices"]),
             "label": list(r["mc1_targets"]["labels"]).index(1)} for r in raw]


def arc_items(raw: list) -> list:
    """ARC rows -> items ``{"prompt", "choices", "label"}``."""
    return [{"prompt": f"Question: {r['question']}\nAnswer:", "choices": list(r["choices"]["text"]),
             "label": list(r["choices"]["label"]).index(r["answerKey"])} for r in raw]


@torch.no_grad()
def choice_logprobs(lm, items: list, batch_size: int = 16) -> list:
    """Summed log-probability of each choice's tokens after the prompt, joined as
    lm-evaluation-harness joins them: after a text prompt with a space, after a chat prompt
    (messages, ending in the assistant header) with nothing."""
    tok = lm.tokenizer
    examples, owner = [], []
    for k, item in enumerate(items):
        prompt = lm.prompt_ids(item["prompt"])
        space = " " if isinstance(item["prompt"], str) else ""
        for choice in item["choices"]:
            ids = tok(space + choice, add_special_tokens=False)["input_ids"]
            examples.append({"input_ids": prompt + ids,
                             "completion_mask": [0] * len(prompt) + [1] * len(ids)})
            owner.append(k)
    scores = [[] for _ in items]
    was_training = lm.model.training
    lm.model.eval()
    for s in range(0, len(examples), batch_size):
        batch = lm.collate(examples[s:s + batch_size])
        logp, _ = lm.token_logprobs(batch)
        for k, v in zip(owner[s:s + batch_size], (logp * batch["completion_mask"]).sum(1).tolist()):
            scores[k].append(v)
    lm.model.train(was_training)
    return scores


def mc_scores(lm, items: list, batch_size: int = 16) -> tuple:
    """``(acc, acc_norm)`` as lm-evaluation-harness scores ARC: the choice with the highest summed
    log-likelihood, and with the highest log-likelihood per character of the choice's text."""
    scores = choice_logprobs(lm, items, batch_size)
    acc = norm = 0
    for s, item in zip(scores, items):
        per_char = [v / len(c) for v, c in zip(s, item["choices"])]
        acc += max(range(len(s)), key=s.__getitem__) == item["label"]
        norm += max(range(len(s)), key=per_char.__getitem__) == item["label"]
    return acc / len(items), norm / len(items)


def mc_accuracy(lm, items: list, batch_size: int = 16) -> float:
    return mc_scores(lm, items, batch_size)[0]


# -------------------------------------------------------------------------- the experiment's world
LOCAL_FILES = {"gsm8k_train": "gsm8k_train.jsonl", "gsm8k_test": "gsm8k_test.jsonl",
               "truthfulqa": "truthfulqa_mc.jsonl", "arc": "arc_challenge.jsonl"}


def world_data(n_train: int, n_eval: int, n_ood: int, data_dir=None) -> dict:
    """The GSM8K experiment's data: training rows, held-out test rows and the OOD items, from the
    hub or from ``data_dir`` (files named as in ``LOCAL_FILES``, in the hub schemas)."""
    def load(key, name, config, split, n):
        return load_split(name, config, split,
                          None if data_dir is None else f"{data_dir}/{LOCAL_FILES[key]}", n)
    gsm8k = ("openai/gsm8k", "main")
    return {"train": gsm8k_rows(load("gsm8k_train", *gsm8k, "train", n_train)),
            "test": gsm8k_rows(load("gsm8k_test", *gsm8k, "test", n_eval)),
            "ood": {"truthfulqa": truthfulqa_items(load("truthfulqa", "truthfulqa/truthful_qa",
                                                        "multiple_choice", "validation", n_ood)),
                    "arc": arc_items(load("arc", "allenai/ai2_arc", "ARC-Challenge", "test",
                                          n_ood))}}


class Evaluator:
    """GSM8K exact match (``id_acc``), multiple-choice accuracy per OOD benchmark
    (``ood_truthfulqa``, ``ood_arc``; their mean is ``ood_acc``), NLL and entropy on held-out
    GSM8K solutions."""

    def __init__(self, lm, test_rows: list, ood: dict, max_new_tokens: int = 320, max_length=None):
        self.test_rows, self.ood, self.max_new_tokens = test_rows, ood, max_new_tokens
        self.heldout = lm.encode(test_rows, max_length=max_length)

    def __call__(self, lm) -> dict:
        out = {"id_acc": gsm8k_accuracy(lm, self.test_rows, self.max_new_tokens)}
        for name, items in self.ood.items():
            out[f"ood_{name}"] = mc_accuracy(lm, items)
        out["ood_acc"] = sum(out[f"ood_{n}"] for n in self.ood) / len(self.ood)
        held = heldout_eval(lm, self.heldout)
        out["heldout_nll"], out["entropy"] = held["heldout_nll"], held["heldout_entropy"]
        return out
