"""Why DFT ends *below* the base in domain (toy world, the cpu preset): what its greedy answers
get wrong, beside the base's and SFT's (same data, order, lr and schedule; seed 0).

    python benchmarks/dft_errors.py     # a few minutes on 2 cores; prints the table

DFT's loss is -stopgrad(p_t) log p_t: a token's gradient is scaled by the probability the model
already gives it. The printout measures, on 256 held-out reversals, where the greedy answers go
wrong and how probable each part of the demonstrations is (mean p per token, by role:
``toy.completion_roles``) before and after fine-tuning.
"""
import statistics

import torch

from minipsft.lab import toy
from minipsft.lab.presets import PRESETS, arm_config, cache_folder
from minipsft.lab.worlds import make_world
from minipsft.model import CausalLM
from minipsft.train import train


def mean_p_by_role(lm, rows) -> dict:
    """Mean probability of the demonstrated token, by role (content / format) and position."""
    out = {"content": [], "format": [], "first answer letter": [], "separator ;": []}
    for row in rows:
        batch = lm.collate(lm.encode([row]))
        with torch.no_grad():
            logp = lm.token_logprobs(batch)[0][0][batch["completion_mask"][0].bool()]
        text = row["completion"]
        roles = toy.completion_roles(text) + ["format"]  # the end of text
        for k, (lp, role) in enumerate(zip(logp.tolist(), roles)):
            out[role].append(lp)
            if k == 0:
                out["first answer letter"].append(lp)
            if k < len(text) and text[k] == ";":
                out["separator ;"].append(lp)
    return {k: statistics.fmean(torch.tensor(v).exp().tolist()) for k, v in out.items()}


def errors(lm, rows) -> dict:
    """Greedy answers: accuracy, and among the wrong ones how they are wrong."""
    outs = lm.generate([r["prompt"] for r in rows], max_new_tokens=toy.answer_tokens(rows))
    answers = [o.strip().split(";", 1)[0] for o in outs]
    wrong = [(a, r["answers"][0]) for a, r in zip(answers, rows) if a not in r["answers"]]
    n = max(1, len(wrong))
    return {"accuracy": 1 - len(wrong) / len(rows),
            "with the reflection tail": sum(";" in o for o in outs) / len(outs),
            "wrong: right letters, wrong order": sum(sorted(a) == sorted(t) for a, t in wrong) / n,
            "wrong: too short": sum(len(a) < len(t) for a, t in wrong) / n,
            "wrong: too long": sum(len(a) > len(t) for a, t in wrong) / n,
            "example": outs[next((k for k, (a, r) in enumerate(zip(answers, rows))
                                  if a not in r["answers"]), 0)]}


def main():
    torch.set_num_threads(2)
    p = PRESETS["cpu"]
    world = make_world(p)
    path = world.base_model(cache_folder(None), "cpu")[0]
    held = toy.id_rows(256, seed=1)
    train_rows = world.train_rows(0)
    table = {}
    for arm in ("base", "sft", "dft"):
        lm = CausalLM.from_pretrained(path, dtype="float32")
        if arm != "base":
            train(lm, lm.encode(train_rows), arm_config(p, arm, seed=0))
        lm.model.eval()
        table[arm] = errors(lm, held) | mean_p_by_role(lm, held[:64])
    for key in table["base"]:
        cells = [v[key] if isinstance(v[key], str) else f"{v[key]:.3f}" for v in table.values()]
        print(f"{key:36s} " + " | ".join(f"{arm}: {c}" for arm, c in zip(table, cells)))


if __name__ == "__main__":
    main()
