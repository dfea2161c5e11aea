"""The command line: a real run through ``python -m minipsft`` and every bad-input case."""
import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from conftest import addition_rows
from minipsft.cli import main


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_command_writes_history_and_final_model(saved_model_dir, tmp_path):
    data = _jsonl(tmp_path / "train.jsonl", addition_rows(16))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "minipsft", "train", "--model", str(saved_model_dir), "--data", str(data),
           "--method", "psft", "--epochs", "2", "--lr", "3e-3", "--batch-size", "8", "--minibatch-size", "2",
           "--eps-high", "0.28", "--seed", "0", "--out", str(out), "--eval-data", str(data), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(1, 17))
    assert all({"step", "epoch", "loss", "entropy", "clipfrac"} <= set(r) for r in history)
    assert max(r["clipfrac"] for r in history) > 0
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 1, 2] and evals[-1]["heldout_nll"] < evals[0]["heldout_nll"]
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_train_accepts_conversational_parquet(saved_model_dir, tmp_path):
    import datasets

    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in addition_rows(8)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    main(["train", "--model", str(saved_model_dir), "--data", str(tmp_path / "chat.parquet"), "--method", "sft",
          "--epochs", "1", "--batch-size", "4", "--minibatch-size", "4", "--out", str(tmp_path / "o"), "--no-progress"])
    assert len((tmp_path / "o" / "history.jsonl").read_text().splitlines()) == 2


GOOD = {"prompt": "1+1=", "completion": "2"}


@pytest.mark.parametrize("rows, message", [
    ([GOOD, {"prompt": "1+2="}], "row 2: field 'completion' is missing"),
    ([GOOD, GOOD, {"prompt": "1+2=", "completion": ""}], "row 3: field 'completion' is empty"),
    ([{"prompt": "  ", "completion": "3"}, GOOD], "row 1: field 'prompt' is empty"),
    ([{"messages": [{"role": "user", "content": "1+1="}]}], "row 1: field 'messages' must end with an assistant"),
    ([GOOD, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}],
     "row 2: field 'messages': message 1 needs a non-empty 'role' and 'content'"),
    ([GOOD, {"prompt": "1" * 70, "completion": "2"}], "row 2: completion truncated away"),
])
def test_bad_rows_fail_before_training_naming_the_row(saved_model_dir, tmp_path, capsys, rows, message):
    data = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(saved_model_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    assert e.value.code != 0 and message in str(e.value.code)
    assert not (tmp_path / "o").exists()  # nothing was trained


def test_bad_file_and_settings_are_clear_errors(saved_model_dir, tmp_path):
    for args, message in [(["--data", str(tmp_path / "none.jsonl")], "no such file"),
                          (["--data", str(_jsonl(tmp_path / "d.csv", [GOOD]))], "unknown data format"),
                          (["--data", str(_jsonl(tmp_path / "d.jsonl", [GOOD])), "--minibatch-size", "512"],
                           "minibatch_size=512 is larger than batch_size=256")]:
        with pytest.raises(SystemExit) as e:
            main(["train", "--model", str(saved_model_dir), "--out", str(tmp_path / "o"), *args])
        assert message in str(e.value.code)


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--minibatch-size", "--eps-high", "--refresh-pi-old", "--sft-warmup-steps", "--resume"):
        assert flag in text


def test_reproduce_set_parses_each_field_by_its_type():
    from minipsft.lab.commands import preset_overrides

    assert preset_overrides(["lr=3e-4", "epochs=2", "compile=true", "length_bucketing=no", "max_length=512"]) == \
        {"lr": 3e-4, "epochs": 2, "compile": True, "length_bucketing": False, "max_length": 512}
    for bad, message in [("compile=maybe", "compile takes true or false"), ("nonsense=1", "FIELD=VALUE"),
                         ("seeds=1", "FIELD=VALUE")]:
        with pytest.raises(SystemExit, match=message):
            preset_overrides([bad])


def _error(argv, capsys=None) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    return str(e.value.code)


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+2=", "completion": "3"\n',
     "line 2: not valid JSON"),
    ("", "the file is empty"),
    ('{"prompt": "1+1=", "completion": "2"}\n\n{"prompt": "1+2=", "completion": "3"}\n',
     "line 2 is blank"),
    ('{"prompt": "1+1=", "completion": 2}\n',
     "row 1: field 'completion' is int (2), expected a string"),
    ('["1+1=", "2"]\n', "line 1: expected a JSON object, found list"),
])
def test_bad_jsonl_is_one_line_naming_the_line(saved_model_dir, tmp_path, text, message):
    data = tmp_path / "d.jsonl"
    data.write_text(text)
    error = _error(["train", "--model", str(saved_model_dir), "--data", str(data),
                    "--out", str(tmp_path / "o")])
    assert message in error and str(data) in error and "Traceback" not in error


def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _jsonl(tmp_path / "d.jsonl", [GOOD])
    (tmp_path / "empty").mkdir()
    for model, message in [(str(tmp_path / "missing"), "does not exist"),
                           (str(tmp_path / "empty"), "has no config.json"),
                           ("someone/not-a-real-model-xyz", "offline mode is on (HF_HUB_OFFLINE")]:
        error = _error(["train", "--model", model, "--data", str(data),
                        "--out", str(tmp_path / "o")])
        assert message in error and model in error and "\n" not in error


def test_debug_shows_the_traceback(saved_model_dir, tmp_path):
    from minipsft.errors import DataError, ModelLoadError

    data = _jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ModelLoadError):  # the exception itself, not a one-line exit
        main(["train", "--model", str(tmp_path / "missing"), "--data", str(data), "--out",
              str(tmp_path / "o"), "--debug"])
    with pytest.raises(DataError):  # the data are read (and refused) before the model loads
        main(["train", "--model", str(saved_model_dir), "--data", str(tmp_path / "none.jsonl"),
              "--out", str(tmp_path / "o"), "--debug"])


def test_bad_device_dtype_and_resume_without_checkpoint_are_one_line(saved_model_dir, tmp_path):
    data = str(_jsonl(tmp_path / "d.jsonl", [GOOD]))
    base = ["train", "--model", str(saved_model_dir), "--data", data, "--out", str(tmp_path / "o")]
    assert "dtype 'bogus': use float32" in _error(base + ["--dtype", "bogus"])
    assert "device 'gpu': use cpu, cuda" in _error(base + ["--device", "gpu"])
    assert "no checkpoint at" in _error(base + ["--resume"])
    assert "exclude each other" in _error(base + ["--resume", "--overwrite"])


def test_out_holding_a_run_is_refused_unless_resume_or_overwrite(saved_model_dir, tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", addition_rows(8))
    argv = ["train", "--model", str(saved_model_dir), "--data", str(data),
            "--out", str(tmp_path / "o"), "--epochs", "1", "--batch-size", "4",
            "--minibatch-size", "2", "--no-progress"]
    main(argv)
    assert "already holds a run: add --resume to continue it or --overwrite" in _error(argv)
    main(argv + ["--overwrite", "--lr", "1e-9"])
    out = capsys.readouterr().out
    assert "PSFT never clipped" in out and "raise the lr" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["steps_with_clipping"] == 0 and summary["psft_steps"] == 4


def test_help_states_defaults_once_and_ends_with_examples(capsys):
    for command in ("train", "reproduce", "reproduce-rl"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: [])" not in text
        assert "examples: python -m minipsft " + command in text
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "fields: n_train, n_id_eval" in text and "--list-presets" in text
    assert text.count("(default: 0.1)") == 0  # no train flags here
    main(["reproduce", "--list-presets"])
    listing = capsys.readouterr().out
    assert "quick:" in listing and "cpu:" in listing and "lr=0.0001" in listing
