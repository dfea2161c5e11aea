"""LoRA in minipsft's own loop: only the adapter moves, the clip acts, pi_ref is the model with its
adapter off (no copy), resume equals an uninterrupted run, the adapter and the merged model load."""
import json

import pytest
import torch

from conftest import addition_rows, tiny_lm
from minipsft.cli import main
from minipsft.model import CausalLM
from minipsft.runs import RunFolder, load_checkpoint
from minipsft.speed import token_logprobs
from minipsft.train import TrainConfig, train

peft = pytest.importorskip("peft")


def cfg(**kw):
    base = dict(method="psft", epochs=2, lr=5e-2, batch_size=8, minibatch_size=2, progress=False)
    return TrainConfig(**{**base, **kw})


def _lora_lm():
    return tiny_lm().add_lora(r=4)


def test_only_the_adapter_moves_and_the_clip_acts():
    lm = _lora_lm()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    hist = train(lm, lm.encode(addition_rows(16)), cfg())["history"]
    assert max(r["clipfrac"] for r in hist) > 0
    moved = {n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert {n for n in before if "lora_B" in n} <= moved


def test_sft_kl_and_anchored_psft_use_the_adapter_off_not_a_copy(monkeypatch):
    lm = _lora_lm()
    monkeypatch.setattr(CausalLM, "frozen_copy", lambda self: pytest.fail("copied the model"))
    examples = lm.encode(addition_rows(16))
    hist = train(lm, examples, cfg(method="sft_kl", epochs=1))["history"]
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-7) and hist[-1]["kl"] > 1e-4
    hist = train(_lora_lm(), examples, cfg(refresh_pi_old=False, epochs=1))["history"]
    assert hist[0]["ratio_mean"] == pytest.approx(1.0) and abs(hist[-1]["ratio_mean"] - 1) > 1e-3
    with lm.model.disable_adapter():  # pi_ref: exactly the base model's log-probs
        batch = lm.collate(examples[:4])
        off = token_logprobs(lm.model, batch["input_ids"], batch["attention_mask"])[0]
    base = tiny_lm()
    torch.testing.assert_close(off, base.token_logprobs(base.collate(examples[:4]))[0])


def test_lora_resume_equals_an_uninterrupted_run(tmp_path):
    rows = addition_rows(16)
    full = _lora_lm()
    full_hist = train(full, full.encode(rows), cfg(checkpoint_every=1), run=RunFolder(tmp_path / "full"))

    def crash(rec):
        if rec["step"] == 7:
            raise KeyboardInterrupt

    cut = _lora_lm()
    with pytest.raises(KeyboardInterrupt):
        train(cut, cut.encode(rows), cfg(checkpoint_every=1), run=RunFolder(tmp_path / "cut"), on_step=crash)
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt", "cpu")["model"]
    assert state and all("lora_" in k for k in state)  # the adapter only, not the base
    resumed = _lora_lm()
    hist = train(resumed, resumed.encode(rows), cfg(checkpoint_every=1), run=RunFolder(tmp_path / "cut", resume=True))["history"]
    assert [r["loss"] for r in hist] == [r["loss"] for r in full_hist["history"]]
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_cli_saves_an_adapter_peft_loads_and_the_merged_model(saved_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(16)))
    out = tmp_path / "o"
    main(["train", "--model", str(saved_model_dir), "--data", str(data), "--out", str(out),
          "--lora-r", "4", "--merge-lora", "--epochs", "1", "--lr", "5e-2", "--batch-size", "8",
          "--minibatch-size", "2", "--no-progress"])
    assert "PSFT clipped on" in capsys.readouterr().out
    assert (out / "final" / "adapter_config.json").exists()
    assert not (out / "final" / "model.safetensors").exists()  # an adapter, not a full model
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_model_dir),
                                        out / "final").eval()  # (injects into the model it gets)
    base = AutoModelForCausalLM.from_pretrained(saved_model_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    lm = tiny_lm()
    batch = lm.collate(lm.encode(addition_rows(4)))
    ids, attn = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        a = token_logprobs(adapted, ids, attn)[0]
        m = token_logprobs(merged, ids, attn)[0]
        b = token_logprobs(base, ids, attn)[0]
    torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)
    assert (a - b).abs().max() > 1e-3  # the adapter changed the model


def test_lora_through_the_fused_head_equals_the_default_path():
    rows = addition_rows(16)
    runs = []
    for fused in (False, True):
        base = tiny_lm()
        lm = CausalLM(base.model, base.tokenizer, device="cpu", fused_head=fused).add_lora(r=4)
        runs.append(train(lm, lm.encode(rows), cfg(epochs=1))["history"])
    assert [r["loss"] for r in runs[0]] == pytest.approx([r["loss"] for r in runs[1]], rel=1e-4)
