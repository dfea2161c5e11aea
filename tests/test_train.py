"""Training loop: learning, the snapshot schedule and the clip, equivalences, resume, determinism, errors."""
import json
from pathlib import Path

import pytest
import torch

from conftest import addition_rows, tiny_lm
from minipsft.logprobs import heldout_eval
from minipsft.runs import RunFolder, load_checkpoint
from minipsft.train import NonFiniteLossError, TrainConfig, train


def cfg(**kw):
    base = dict(method="psft", epochs=2, lr=3e-3, batch_size=16, minibatch_size=4, progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def examples():
    return tiny_lm().encode(addition_rows(32))


def _weights(lm):
    return [p.detach().clone() for p in lm.model.parameters()]


def _no_timing(history):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in history]


def test_tiny_model_memorises_a_small_set(tmp_path):
    from minipsft.model import CausalLM

    tiny_lm().save_pretrained(tmp_path)
    lm = CausalLM.from_pretrained(tmp_path, device="cpu")  # built from a config, saved and reloaded
    ex = lm.encode(addition_rows(8))
    before = heldout_eval(lm, ex)["heldout_nll"]
    train(lm, ex, cfg(method="sft", epochs=60, lr=1e-2, batch_size=8, minibatch_size=8))
    after = heldout_eval(lm, ex)["heldout_nll"]
    assert after < 0.1 * before and after < 0.3
    greedy = lm.generate([r["prompt"] for r in addition_rows(8)], max_new_tokens=4)
    assert sum(g == r["completion"] for g, r in zip(greedy, addition_rows(8))) >= 6


def test_psft_with_several_minibatches_per_snapshot_clips(examples):
    hist = train(tiny_lm(), examples, cfg(epochs=3))["history"]
    assert max(r["clipfrac"] for r in hist) > 0
    # the first minibatch of every snapshot sees r == 1 exactly: nothing can be clipped there
    for r in hist[::4]:
        assert r["clipfrac"] == 0.0 and r["ratio_mean"] == pytest.approx(1.0) and r["ratio_max"] == pytest.approx(1.0)
    assert {"step", "epoch", "loss", "entropy", "clipfrac", "ratio_mean", "approx_kl", "grad_norm", "lr",
            "tokens_per_s", "nll"} <= set(hist[0])


def test_one_minibatch_per_snapshot_is_exactly_sft(examples):
    lm_sft, lm_psft = tiny_lm(), tiny_lm()
    train(lm_sft, examples, cfg(method="sft", batch_size=4, minibatch_size=4))
    hist = train(lm_psft, examples, cfg(method="psft", batch_size=4, minibatch_size=4))["history"]
    assert all(r["clipfrac"] == 0.0 for r in hist)
    for a, b in zip(_weights(lm_sft), _weights(lm_psft)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_same_data_order_for_every_method_and_batch_size(examples):
    from minipsft.train import epoch_batches as _epoch_batches
    a = sum(_epoch_batches(32, cfg(batch_size=16), 1), [])
    b = sum(_epoch_batches(32, cfg(batch_size=4, minibatch_size=4, method="sft"), 1), [])
    assert a == b and sorted(a) == list(range(32)) and a != sum(_epoch_batches(32, cfg(), 0), [])


def test_same_seed_same_history_other_seed_differs(examples):
    h1 = train(tiny_lm(), examples, cfg(epochs=1))["history"]
    h2 = train(tiny_lm(), examples, cfg(epochs=1))["history"]
    h3 = train(tiny_lm(), examples, cfg(epochs=1, seed=1))["history"]
    assert _no_timing(h1) == _no_timing(h2)
    assert [r["loss"] for r in h1] != [r["loss"] for r in h3]


def test_resume_after_interruption_equals_uninterrupted_run(examples, tmp_path):
    full_lm = tiny_lm()
    full = train(full_lm, examples, cfg(epochs=2, checkpoint_every=1), run=RunFolder(tmp_path / "full"),
                 eval_fn=lambda lm: heldout_eval(lm, examples[:4]))

    def crash(rec):
        if rec["step"] == 11:  # mid-batch in epoch 2: the last checkpoint is after step 8 (batch 2)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_lm(), examples, cfg(epochs=2, checkpoint_every=1), run=RunFolder(tmp_path / "cut"),
              eval_fn=lambda lm: heldout_eval(lm, examples[:4]), on_step=crash)
    resumed_lm = tiny_lm()
    resumed = train(resumed_lm, examples, cfg(epochs=2, checkpoint_every=1), run=RunFolder(tmp_path / "cut", resume=True), eval_fn=lambda lm: heldout_eval(lm, examples[:4]))
    assert _no_timing(resumed["history"]) == _no_timing(full["history"])
    assert resumed["evals"] == full["evals"]
    for a, b in zip(_weights(full_lm), _weights(resumed_lm)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    lines = (tmp_path / "cut" / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 17))


def test_resume_refuses_changed_data_or_schedule_and_a_run_in_the_folder(examples, tmp_path):
    train(tiny_lm(), examples, cfg(epochs=1), run=RunFolder(tmp_path))
    with pytest.raises(ValueError, match=r"differ.*'batch_size'.*only lr, grad_clip may change"):
        train(tiny_lm(), examples, cfg(epochs=1, batch_size=4, minibatch_size=4), run=RunFolder(tmp_path, resume=True))
    with pytest.raises(FileNotFoundError):
        train(tiny_lm(), examples, cfg(epochs=1), run=RunFolder(tmp_path / "none", resume=True))
    with pytest.raises(FileExistsError, match="already holds a run.*resume.*overwrite"):
        train(tiny_lm(), examples, cfg(epochs=1), run=RunFolder(tmp_path))
    def crash(rec):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an overwriting run that stops at once keeps nothing
        train(tiny_lm(), examples, cfg(epochs=1), run=RunFolder(tmp_path, overwrite=True), on_step=crash)
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "final").exists()
    again = train(tiny_lm(), examples, cfg(epochs=1, seed=3), run=RunFolder(tmp_path, overwrite=True))
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [r["loss"] for r in again["history"]]


def test_resume_at_a_lower_lr_warns_and_trains_at_the_new_lr(examples, tmp_path):
    from minipsft.train import lr_lambda as _lr_lambda

    def crash(rec):
        if rec["step"] == 6:
            raise KeyboardInterrupt

    schedule = dict(epochs=2, checkpoint_every=1, lr_warmup_steps=2, lr_schedule="cosine")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_lm(), examples, cfg(lr=1e-2, **schedule), run=RunFolder(tmp_path), on_step=crash)
    with pytest.warns(UserWarning, match=r"lr 0.01 -> 0.001.*no longer equal"):
        hist = train(tiny_lm(), examples, cfg(lr=1e-3, **schedule), run=RunFolder(tmp_path, resume=True))["history"]
    factor = _lr_lambda(cfg(**schedule), 16)  # the schedule's factor after `step` steps
    # steps 1-4 ran before the checkpoint (after batch 1) at the old lr, the rest at the new one
    assert [r["lr"] for r in hist[:4]] == pytest.approx([1e-2 * factor(s) for s in range(4)])
    assert [r["lr"] for r in hist[4:]] == pytest.approx([1e-3 * factor(s) for s in range(4, 16)])


def test_summary_says_when_psft_never_clipped(examples):
    from minipsft.runs import summarize

    quiet = cfg(epochs=1, lr=1e-7)
    summary = summarize(train(tiny_lm(), examples, quiet)["history"], quiet)
    assert summary["steps_with_clipping"] == 0 and summary["psft_steps"] == 8
    assert "never clipped" in summary["note"] and "raise the lr" in summary["note"]
    loud = cfg(epochs=1, lr=3e-2)
    summary = summarize(train(tiny_lm(), examples, loud)["history"], loud)
    assert 0 < summary["steps_with_clipping"] <= 8 and summary["mean_clipfrac"] > 0
    assert "watch final_nll" in summary["note"]
    assert {"final_loss", "final_nll", "tokens_per_s", "max_ratio"} <= set(summary)


def test_anchored_pi_old_never_refreshes(examples):
    hist = train(tiny_lm(), examples, cfg(refresh_pi_old=False))["history"]
    # against the starting model the ratio drifts; with refresh it is exactly 1 at each snapshot
    assert hist[0]["ratio_mean"] == pytest.approx(1.0)
    assert abs(hist[8]["ratio_mean"] - 1.0) > 1e-3


def test_sft_warmup_then_psft(examples):
    hist = train(tiny_lm(), examples, cfg(sft_warmup_steps=6))["history"]
    assert [r["method"] for r in hist[:7]] == ["sft"] * 6 + ["psft"]
    assert hist[6]["ratio_mean"] == pytest.approx(1.0)  # the snapshot is taken when PSFT starts, mid-batch
    assert hist[5]["clipfrac"] == 0.0 and hist[5]["ratio_mean"] is None


def test_micro_batches_give_the_same_step(examples):
    a, b = tiny_lm(), tiny_lm()
    ha = train(a, examples, cfg(epochs=1))["history"]
    hb = train(b, examples, cfg(epochs=1, micro_batch_size=1))["history"]
    for x, y in zip(_weights(a), _weights(b)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    assert ha[-1]["clipfrac"] == pytest.approx(hb[-1]["clipfrac"])


@pytest.mark.parametrize("method", ["dft", "sft_kl"])
def test_baselines_train_and_log(examples, method):
    lm = tiny_lm()
    before = heldout_eval(lm, examples)["heldout_nll"]
    hist = train(lm, examples, cfg(method=method))["history"]
    assert heldout_eval(lm, examples)["heldout_nll"] < before
    if method == "sft_kl":
        assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-6) and hist[-1]["kl"] > 0


def test_eval_at_start_and_after_every_epoch(examples, tmp_path):
    res = train(tiny_lm(), examples, cfg(epochs=2, eval_every=3), run=RunFolder(tmp_path),
                eval_fn=lambda lm: {"x": 1.0})
    assert [e["epoch"] for e in res["evals"] if e["epoch"] in (0, 1, 2)] == [0, 1, 2]
    assert [e["step"] for e in res["evals"]] == [0, 3, 6, 8, 9, 12, 15, 16]
    assert (tmp_path / "final" / "config.json").exists() and (tmp_path / "evals.jsonl").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(examples, tmp_path):
    lm = tiny_lm()

    def poison(rec):
        if rec["step"] == 5:
            with torch.no_grad():
                next(lm.model.parameters()).fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 6.*last good checkpoint"):
        train(lm, examples, cfg(checkpoint_every=1), run=RunFolder(tmp_path), on_step=poison)
    ck = load_checkpoint(tmp_path / "checkpoint.pt", "cpu")
    assert ck["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


@pytest.mark.parametrize("bad, msg", [
    (dict(method="ppo"), "method='ppo'"), (dict(minibatch_size=32), "minibatch_size=32 is larger"),
    (dict(batch_size=0), "batch_size=0"), (dict(lr=0.0), "lr > 0"), (dict(lr_schedule="step"), "lr_schedule")])
def test_bad_settings_are_refused(examples, bad, msg):
    with pytest.raises(ValueError, match=msg):
        train(tiny_lm(), examples, cfg(**bad))


def test_length_bucketing_cuts_padding_and_keeps_the_batches():
    lm = tiny_lm()
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": "1" * int(n), "completion": "2" * int(m)}
            for n, m in torch.randint(1, 25, (32, 2), generator=g).tolist()]
    ex = lm.encode(rows)
    pad, tokens = {}, {}
    for bucket in (False, True):
        hist = train(tiny_lm(), ex, cfg(epochs=1, length_bucketing=bucket))["history"]
        pad[bucket] = sum(r["pad_frac"] for r in hist) / len(hist)
        tokens[bucket] = [sum(r["tokens"] for r in hist[k:k + 4]) for k in range(0, len(hist), 4)]
    assert 0 <= pad[True] < pad[False]
    assert tokens[True] == tokens[False]  # the same demonstrations per batch (pi_old snapshot), regrouped


def test_gradient_checkpointing_gives_the_same_gradients():
    from minipsft.model import CausalLM

    a = tiny_lm()
    b = CausalLM(tiny_lm().model, a.tokenizer, device="cpu", gradient_checkpointing=True)
    flag = "is_activation_checkpointing" if hasattr(b.model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert getattr(b.model, flag) and not getattr(a.model, flag)
    batch = a.collate(a.encode(addition_rows(4)))
    for lm in (a, b):
        lm.model.train()
        logp, _ = lm.token_logprobs(batch)
        (logp * batch["completion_mask"]).sum().backward()
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)


def test_sequence_mean_aggregation_equals_a_hand_written_reference():
    # completions of very different lengths: "3" vs "123456789"
    rows = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "9=", "completion": "123456789"},
            {"prompt": "5+5=", "completion": "10"}, {"prompt": "1=", "completion": "1111"}]
    lm = tiny_lm()
    examples = lm.encode(rows)
    batch = lm.collate(examples)
    with torch.no_grad():
        logp = lm.token_logprobs(batch)[0]
    mask = batch["completion_mask"].float()
    per_row = (-logp * mask).sum(1) / mask.sum(1)  # each demonstration's token-mean NLL
    reference = per_row.mean()
    pooled = (-logp * mask).sum() / mask.sum()
    assert abs(reference - pooled) > 1e-3  # the two readings differ on these rows
    common = dict(method="sft", epochs=1, batch_size=4, minibatch_size=4, lr=1e-2)
    first = train(tiny_lm(), examples, cfg(**common, loss_aggregation="seq_mean_token_mean"))
    assert first["history"][0]["loss"] == pytest.approx(reference.item(), rel=1e-5)
    # micro-batches of one demonstration give the same step (each weighs 1/4, not its token share)
    whole, micro = tiny_lm(), tiny_lm()
    train(whole, examples, cfg(**common, loss_aggregation="seq_mean_token_mean"))
    train(micro, examples,
          cfg(**common, loss_aggregation="seq_mean_token_mean", micro_batch_size=1))
    pooled_lm = tiny_lm()
    train(pooled_lm, examples, cfg(**common))
    for a, b, c in zip(_weights(whole), _weights(micro), _weights(pooled_lm)):
        # AdamW's first step is ~lr * sign(grad): a gradient near 0 magnifies float32 noise
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert max((a - c).abs().max() for a, c in zip(_weights(whole), _weights(pooled_lm))) > 1e-4


def test_official_warmup_counts_batches_and_starts_at_zero(examples):
    # 32 examples, batches of 16, minibatches of 4: 4 steps per batch
    hist = train(tiny_lm(), examples, cfg(epochs=1, lr=1e-2, lr_warmup_batches=2))["history"]
    assert [r["lr"] for r in hist] == pytest.approx([0.0] * 4 + [5e-3] * 4)
    with pytest.raises(ValueError, match="set one of the two"):
        cfg(lr_warmup_steps=2, lr_warmup_batches=2).check()
    with pytest.raises(ValueError, match="loss_aggregation='sum'"):
        cfg(loss_aggregation="sum").check()


def test_a_checkpoint_that_would_run_code_is_refused_on_resume(examples, tmp_path):
    """A checkpoint is data: one holding a pickled object whose loading runs code is refused."""
    train(tiny_lm(), examples, cfg(epochs=1), run=RunFolder(tmp_path))
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # tensors and plain values

    class Payload:
        def __reduce__(self):  # unpickling this would call exec(...)
            return (exec, ("open('PWNED', 'w').write('ran')",))

    ck["history"] = Payload()
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="only tensors and plain values; refused"):
        train(tiny_lm(), examples, cfg(epochs=1), run=RunFolder(tmp_path, resume=True))
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
