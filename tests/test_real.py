"""Real data sets on fixtures in the exact hub schemas (written by the project; no hub access):
GSM8K answer extraction and formatting, multiple-choice scoring by log-likelihood."""
from pathlib import Path

import pytest
import torch

from conftest import tiny_lm
from minipsft.lab import real

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("text, expected", [
    ("so 48+24 = 72 clips\n#### 72", "72"), ("#### 3,600", "3600"), ("The answer is \\boxed{1,000}.", "1000"),
    ("first 3 then 4.50 dollars", "4.5"), ("-7 degrees", "-7"), ("no number here", None), ("#### 10.0", "10")])
def test_extract_answer(text, expected):
    assert real.extract_answer(text) == expected


def test_gsm8k_rows_from_the_hub_schema():
    rows = real.gsm8k_rows(real.load_split("openai/gsm8k", "main", "test", path=FIXTURES / "gsm8k_test.jsonl"))
    assert [r["final"] for r in rows] == ["72", "10", "3600"]
    user, assistant = rows[0]["messages"]
    assert user["role"] == "user" and real.INSTRUCTION in user["content"]
    assert "<<" not in assistant["content"] and assistant["content"].endswith("#### 72")
    with pytest.raises(ValueError, match="GSM8K row 1"):
        real.gsm8k_rows([{"question": "q", "answer": "no marker"}])


def test_gsm8k_rows_train_and_generate_through_the_chat_template():
    lm = tiny_lm(max_positions=512)
    rows = real.gsm8k_rows(real.load_split("openai/gsm8k", "main", "test", path=FIXTURES / "gsm8k_test.jsonl", n=2))
    examples = lm.encode(rows)
    assert len(examples) == 2 and all(sum(e["completion_mask"]) > 0 for e in examples)
    acc = real.gsm8k_accuracy(lm, rows, max_new_tokens=8)
    assert 0.0 <= acc <= 1.0


def test_multiple_choice_items_from_the_hub_schemas():
    tqa = real.truthfulqa_items(real.load_split("truthfulqa/truthful_qa", "multiple_choice", "validation",
                                                path=FIXTURES / "truthfulqa_mc.jsonl"))
    arc = real.arc_items(real.load_split("allenai/ai2_arc", "ARC-Challenge", "test", path=FIXTURES / "arc_challenge.jsonl"))
    assert [i["label"] for i in tqa] == [0, 1] and [i["label"] for i in arc] == [0, 0]
    assert arc[0]["choices"] == ["the Sun", "the Moon", "a mirror", "a rock"]


def test_choice_scores_are_summed_token_logprobs_and_pick_the_argmax():
    lm = tiny_lm()
    items = [{"prompt": "1+1=", "choices": ["2", "11", "3"], "label": 0}, {"prompt": "2+2=", "choices": ["4", "22"], "label": 1}]
    scores = real.choice_logprobs(lm, items, batch_size=2)  # batches cut across items
    assert [len(s) for s in scores] == [3, 2]
    # by hand: log p(" 11" | "1+1=") = sum over its three tokens
    ids = lm.prompt_ids("1+1=") + lm.tokenizer(" 11", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    by_hand = sum(logits[t - 1, ids[t]].item() for t in range(len(ids) - 3, len(ids)))
    assert scores[0][1] == pytest.approx(by_hand, abs=1e-4)
    expected = sum(max(range(len(s)), key=s.__getitem__) == it["label"] for s, it in zip(scores, items)) / 2
    assert real.mc_accuracy(lm, items) == expected


def test_reproduce_gsm8k_runs_the_whole_pipeline_on_a_local_model(tmp_path):
    import json
    import subprocess
    import sys

    model_dir = tmp_path / "model"
    tiny_lm(max_positions=512).save_pretrained(model_dir)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "minipsft", "reproduce", "--preset", "gsm8k", "--model", str(model_dir),
           "--data-dir", str(FIXTURES), "--out", str(out), "--device", "cpu",
           *[a for kv in ("n_train=3", "n_id_eval=3", "ood_per_task=2", "epochs=2", "batch_size=2",
                          "minibatch_size=1", "micro_batch_size=1", "compile=false", "max_new_tokens=8",
                          "max_length=480") for a in ("--set", kv)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    assert {r["method"] for r in records} == {"psft", "sft", "sft_paper"}
    # sft_paper's 2-row minibatch ran as 2 accumulated micro-batches, in length buckets (the preset's default)
    config = results["summary"]["preset_config"]
    assert (config["micro_batch_size"], config["length_bucketing"], config["compile"]) == (1, True, False)
    assert sorted(r["epoch"] for r in records if r["method"] == "psft") == [0, 1, 2]
    for r in records:
        assert {"method", "seed", "epoch", "entropy", "id_acc", "ood_acc", "ood_truthfulqa", "ood_arc"} <= set(r)
    assert (out / "epoch_stability.png").exists() and (out / "tradeoff.png").exists()
    report = (out / "report.md").read_text()  # in GSM8K's words, every cell a number
    assert report.startswith("# SFT vs PSFT on GSM8K") and "ood_truthfulqa" in report
    assert "nan" not in report and "toy" not in report.lower()


def test_reproduce_gsm8k_needs_a_model(tmp_path):
    from minipsft.cli import main

    with pytest.raises(SystemExit, match="pass --model"):
        main(["reproduce", "--preset", "gsm8k", "--out", str(tmp_path)])


def test_gsm8k_preset_accumulates_micro_batches_in_length_buckets_for_every_arm():
    from minipsft.lab.presets import PRESETS, arm_config

    p = PRESETS["gsm8k"]
    for arm in p.arms:
        cfg = arm_config(p, arm)
        assert (cfg.micro_batch_size, cfg.length_bucketing) == (8, True)
    assert arm_config(p, "sft_paper").minibatch_size == 256  # the paper recipe: one step per 256 demonstrations


def test_same_preset_reads_settings_missing_from_an_old_results_folder_as_their_defaults():
    import json
    from dataclasses import asdict, replace

    from minipsft.lab.presets import PRESETS, same_preset

    saved = json.loads(json.dumps(asdict(PRESETS["cpu"])))
    for later in ("micro_batch_size", "length_bucketing", "compile", "gradient_checkpointing"):
        del saved[later]  # a folder written before these settings existed
    assert same_preset(saved, PRESETS["cpu"])
    assert same_preset({**saved, "workers": 7, "threads": 3}, PRESETS["cpu"])  # never change a result
    assert not same_preset(saved, replace(PRESETS["cpu"], micro_batch_size=4))
    assert not same_preset({**saved, "lr": 1.0}, PRESETS["cpu"])


def test_reproduce_or_load_takes_folders_as_paths_and_loads_the_second_time(tmp_path, capsys):
    from minipsft.lab.runner import reproduce_or_load

    model_dir = tmp_path / "model"
    tiny_lm(max_positions=512).save_pretrained(model_dir)
    kw = dict(model=model_dir, data_dir=FIXTURES, device="cpu", arms=("psft",), n_train=2,
              n_id_eval=2, ood_per_task=2, epochs=1, batch_size=2, minibatch_size=1,
              micro_batch_size=1, max_new_tokens=4, max_length=480)
    first = reproduce_or_load("gsm8k", tmp_path / "out", **kw)
    capsys.readouterr()
    second = reproduce_or_load("gsm8k", tmp_path / "out", **kw)
    assert "loaded results" in capsys.readouterr().out
    assert second["records"] == first["records"]
