"""The worlds behind the runner (worlds.py): the files world end to end through the CLI, its
answer extraction and its errors; reports and figures in each world's own words."""
import json
import subprocess
import sys

import pytest
from conftest import addition_rows, tiny_lm

from minipsft.lab import worlds
from minipsft.lab.presets import PRESETS


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model and a user's data set in TRL's formats, with one OOD set of each kind."""
    root = tmp_path_factory.mktemp("files_world")
    tiny_lm().save_pretrained(root / "model")
    subtraction = [{"prompt": f"{a + b}-{b}=", "completion": str(a)}
                   for a, b in ((5, 3), (9, 4), (7, 7), (12, 2))]
    choice = [{"prompt": "2+2=", "choices": ["4", "5", "22"], "label": 0},
              {"prompt": "1+3=", "choices": ["13", "4"], "label": 1},
              {"prompt": "3+3=", "choices": ["6", "33", "9"], "label": 0}]
    return {"model": str(root / "model"), "train": _write(root / "train.jsonl", addition_rows(8)),
            "test": _write(root / "test.jsonl", addition_rows(4, seed=1)),
            "mc": _write(root / "mc.jsonl", choice), "sub": _write(root / "sub.jsonl", subtraction),
            "root": root}


def _compare(files, out, *extra):
    cmd = [sys.executable, "-m", "minipsft", "compare", "--model", files["model"],
           "--train", files["train"], "--test", files["test"],
           "--ood", f"mc={files['mc']}", f"sub={files['sub']}", "--arms", "psft", "sft_paper",
           "--epochs", "2", "--lr", "1e-2", "--sft-paper-lr", "3e-3", "--out", str(out),
           "--device", "cpu", *[a for kv in ("batch_size=8", "minibatch_size=2", "threads=1",
                                             "micro_batch_size=0", "max_new_tokens=4")
                                for a in ("--set", kv)], *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_compare_runs_the_files_world_end_to_end(files, tmp_path):
    proc = _compare(files, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    assert {r["method"] for r in records} == {"psft", "sft_paper"}
    assert sorted(r["epoch"] for r in records if r["method"] == "psft") == [0, 1, 2]
    for r in records:
        assert {"id_acc", "ood_acc", "ood_mc", "ood_sub", "entropy"} <= set(r)
        assert r["ood_acc"] == pytest.approx((r["ood_mc"] + r["ood_sub"]) / 2)
    assert any(r["clipfrac"] for r in records if r["method"] == "psft" and r["epoch"] > 0)
    assert results["summary"]["preset_config"]["world"] == "files"
    report = (out / "report.md").read_text()
    assert report.startswith("# SFT vs PSFT on train.jsonl")
    assert "nan" not in report and "toy" not in report.lower()
    assert "ood_mc" in report and "ood_sub" in report
    for name in ("epoch_stability.png", "tradeoff.png"):
        assert (out / name).stat().st_size > 20_000


def test_compare_names_the_bad_row_before_loading_the_model(files, tmp_path):
    bad_mc = _write(tmp_path / "bad_mc.jsonl", [{"prompt": "1+1=", "choices": ["2", "3"],
                                                 "label": 0},
                                                {"prompt": "2+1=", "choices": ["3"], "label": 0}])
    proc = _compare(dict(files, mc=bad_mc), tmp_path / "out")
    assert proc.returncode != 0 and "bad_mc.jsonl" in proc.stderr and "row 2" in proc.stderr
    bad_train = _write(tmp_path / "bad_train.jsonl", [{"prompt": "1+1=", "completion": "2"},
                                                      {"prompt": "2+1="}])
    proc = _compare(dict(files, train=bad_train), tmp_path / "out2")
    assert proc.returncode != 0 and "row 2" in proc.stderr and "completion" in proc.stderr
    proc = _compare(files, tmp_path / "out3", "--answer", "(unclosed")
    assert proc.returncode != 0 and "answer='(unclosed'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("answer, text, expected", [
    ("whole", "  42 \n", "42"), ("gsm8k", "so 6*7 = 42.\n#### 42", "42"),
    (r"Answer: (\S+)", "think... Answer: 17 done", "17"), (r"\d+", "x 5 y 6", "5"),
    (r"Answer: (\S+)", "no answer here", None), (r"=(\d+)|done", "all done", None)])
def test_answer_extractors(answer, text, expected):
    assert worlds.answer_extractor(answer)(text) == expected


def test_files_world_reward_is_exact_match_of_the_extracted_answer(files):
    from dataclasses import replace

    p = replace(PRESETS["files"], model=files["model"], train_file=files["train"],
                test_file=files["test"], answer=r"(\d+)")
    world = worlds.make_world(p)
    row = {"prompt": "1+2", "completion": "=3"}
    assert world.reward(row, "=3 and more") == 1.0  # the first number is the answer
    assert world.reward(row, "=4") == 0.0 and world.reward(row, "nothing") == 0.0
    messages = {"messages": [{"role": "user", "content": "1+2"},
                             {"role": "assistant", "content": "=3"}]}
    assert world.reward(messages, "=3") == 1.0


def test_each_world_names_its_report_and_figures():
    toy, gsm8k = worlds.world_words({"world": "toy"}), worlds.world_words({"world": "gsm8k"})
    assert "toy" in toy.title and "GSM8K" in gsm8k.title
    files = worlds.world_words({"world": "files", "train_file": "a/mine.jsonl",
                                "test_file": "b/held.jsonl", "ood_files": ["arc=x.jsonl"]})
    assert files.title == "on mine.jsonl" and files.id_name == "held.jsonl"
    assert files.ood_name == "arc"


def test_a_panel_is_drawn_only_for_a_metric_with_data():
    from minipsft.lab.plots import panels

    records = [{"id_acc": 0.5, "ood_acc": 0.4, "ood_arc": 0.3, "ood_truthfulqa": 0.5,
                "entropy": 1.0, "sample_entropy": None}]
    shown = [key for key, _ in panels(records, worlds.world_words({"world": "gsm8k"}))]
    assert shown == ["id_acc", "ood_acc", "entropy", "ood_arc", "ood_truthfulqa"]
    toy = [key for key, _ in panels(records, worlds.world_words({"world": "toy"}))]
    assert toy == ["id_acc", "ood_acc"]  # the toy's per-task OOD keys are not panels


def test_rl_starts_from_a_files_world_checkpoint_with_the_exact_match_reward(files, tmp_path):
    from minipsft.lab.rl_stage import reproduce_rl

    finetune = dict(model=files["model"], train_file=files["train"], test_file=files["test"],
                    ood_files=(f"mc={files['mc']}",), epochs=1, batch_size=8, minibatch_size=2,
                    lr=1e-2, threads=1, micro_batch_size=0, max_new_tokens=4)
    res = reproduce_rl("files", tmp_path / "rl", device="cpu", finetune=finetune,
                       starts=("base", "psft"), steps=2, prompts_per_step=4, group_size=2,
                       minibatch_size=4, eval_every=1, lr=1e-3)
    assert {r["start"] for r in res["records"]} == {"base", "psft"}
    assert set(res["summary"]["best_checkpoints"]) == {"psft-s0"}
    for run in res["runs"]:
        assert [h["step"] for h in run.history] == [1, 2]
        assert all(0.0 <= h["reward"] <= 1.0 for h in run.history)
        assert {"id_acc", "ood_mc", "entropy", "reward"} <= set(run.records[-1])
    report = (tmp_path / "rl" / "report.md").read_text()
    assert report.startswith("# GRPO after fine-tuning on train.jsonl") and "nan" not in report
    assert (tmp_path / "rl" / "rl_after_finetuning.png").stat().st_size > 20_000


def test_the_base_the_fine_tuning_and_the_evaluator_get_the_requested_device(tmp_path,
                                                                              monkeypatch):
    """A spy stands in for a GPU: it records the device asked for and loads on the CPU."""
    from minipsft.lab import runner, toy
    from minipsft.model import CausalLM

    asked = []
    pretrained_base, from_pretrained = toy.pretrained_base, CausalLM.from_pretrained.__func__

    def spy_base(cfg, cache_dir, progress=True, device="cpu", shipped=True):
        asked.append(("base", device))
        return pretrained_base(cfg, cache_dir, progress, "cpu", shipped)

    def spy_load(cls, path, device="auto", **kw):
        asked.append(("fine-tuning", device))
        return from_pretrained(cls, path, device="cpu", **kw)

    evaluated = []
    make_world = runner.make_world

    def spy_world(p):
        world = make_world(p)
        evaluator = world.evaluator
        world.evaluator = lambda base: evaluated.append(base) or evaluator(base)
        return world

    monkeypatch.setattr(toy, "pretrained_base", spy_base)
    monkeypatch.setattr(CausalLM, "from_pretrained", classmethod(spy_load))
    monkeypatch.setattr(runner, "make_world", spy_world)
    runner.reproduce("smoke", tmp_path / "out", cache_dir=tmp_path / "cache", device="cuda:7",
                     arms=("psft",), epochs=1, workers=1)
    assert ("base", "cuda:7") in asked and ("fine-tuning", "cuda:7") in asked
    assert {device for _, device in asked} == {"cuda:7"}
    assert len(evaluated) == 1  # the run's evaluator is built on the model it fine-tunes


def test_compare_without_ood_sets_and_a_messages_test_file_with_set_overriding_a_flag(files,
                                                                                      tmp_path):
    test = [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"]}]}
            for r in addition_rows(3, seed=2)]
    cmd = [sys.executable, "-m", "minipsft", "compare", "--model", files["model"],
           "--train", files["train"], "--test", _write(tmp_path / "test.jsonl", test),
           "--arms", "psft", "--epochs", "3", "--out", str(tmp_path / "out"), "--device", "cpu",
           *[a for kv in ("epochs=1", "batch_size=8", "minibatch_size=2", "threads=1",
                          "max_new_tokens=4") for a in ("--set", kv)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(r["epoch"] for r in results["records"]) == [0, 1]  # --set epochs=1 won
    assert all("ood_acc" not in r for r in results["records"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "nan" not in report and "ood_acc" not in report
    assert not (tmp_path / "out" / "tradeoff.png").exists()  # no OOD, no trade-off to draw


def test_a_regex_that_finds_no_answer_in_a_reference_is_an_error_naming_the_row(files):
    from dataclasses import replace

    p = replace(PRESETS["files"], model=files["model"], train_file=files["train"],
                test_file=files["test"], answer=r"Answer: (\d+)")
    with pytest.raises(worlds.DataError, match="row 1: answer="):
        worlds.make_world(p)
    taken = replace(p, answer="whole", ood_files=(f"acc={files['mc']}",))
    with pytest.raises(ValueError, match="is taken"):
        worlds.make_world(taken)
