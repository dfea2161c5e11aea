"""The speed paths give the reference path's numbers. The reference is ``logprobs.token_logprobs``
(the model's own logits, a log-softmax: ``CausalLM(speed=False)``); the speed paths are the
chunked log-probs from the hidden states with each chunk's logits recomputed or kept, the
architecture logit scales (speed.py) and the fused head (fused.py). For every architecture the
tests build, every registered loss, with micro-batches and with LoRA: log-probs, entropies and
the gradients of one training step through the loop's own ``micro_step``, float32 to 1e-5. The
anchored losses (asft, sft_kl_vocab) take the chunked whole-vocabulary KL on the speed paths."""
import copy

import pytest
import torch

from conftest import tiny_lm
from test_architectures import CONFIGS, build_model
from minipsft import fused, speed
from minipsft.losses import LOSSES
from minipsft.model import CausalLM, Reference
from minipsft.train import Objective, TrainConfig, merge_metrics, micro_batches, micro_step
from minipsft.train import token_weights

PATHS = {"recompute": dict(keep_logits=False), "keep logits": dict(keep_logits=True),
         "fused head": dict(fused_head=True)}


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (4, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0  # padding on the right
    completion = attn.clone()
    completion[:, :5] = 0  # a prompt of five tokens
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": completion}


def _step(lm, batch, method, micro_batch_size):
    """Log-probs, entropies, gradients and metrics of one step on ``batch``, through the loop's
    own micro_step, against a pi_old / pi_ref that differs from the model (so the clip and the KL
    act)."""
    cfg = TrainConfig(method=method, eps_high=0.05, micro_batch_size=micro_batch_size)
    with torch.no_grad():
        logp, entropy = lm.token_logprobs(batch, with_entropy=True)
    other = (logp - 0.3 * torch.rand(logp.shape, generator=torch.Generator().manual_seed(2)))
    other = other * batch["attention_mask"]
    weights = token_weights(batch["completion_mask"])
    reference = _reference(lm) if LOSSES[method].vocab_kl else None
    parts = []
    for rows, micro in micro_batches(batch, cfg):
        objective = Objective(LOSSES[method], cfg, weights[rows], other[rows], other[rows],
                              reference)
        parts.append(micro_step(lm, objective, micro, weights.sum(), None, 0))
    grads = {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None}
    return logp, entropy, grads, merge_metrics(parts)


def _reference(lm):
    """A pi_ref away from the model: the LoRA model with its adapter off, else a perturbed copy."""
    reference = Reference(lm)
    if lm.is_lora:
        reference.copy = None  # the base weights, while the adapter is away from zero
        return reference
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in reference.copy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return reference


def _assert_same(got, expected):
    logp, entropy, grads, metrics = got
    torch.testing.assert_close(logp, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected[1], atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected[2].keys() and grads
    for name, g in expected[2].items():  # float32 rounding only: relative to each gradient
        assert (grads[name] - g).norm() <= 1e-5 * g.norm() + 1e-7, name
    assert metrics["loss"] == pytest.approx(expected[3]["loss"], rel=1e-5, abs=1e-6)


def _wrap(model, **settings):
    tok = tiny_lm().tokenizer
    return CausalLM(copy.deepcopy(model), tok, device="cpu", **settings)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("method", list(LOSSES))
def test_every_speed_path_equals_the_reference(name, method, monkeypatch):
    monkeypatch.setattr(speed, "CHUNK_ELEMENTS", 4 * 3 * 61)  # three positions a chunk
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 4 * 3 * 61)
    model = build_model(name)  # eval mode: no dropout (gpt2), the same math on every path
    batch = _batch()
    expected = _step(_wrap(model, speed=False), batch, method, 0)
    if method == "psft":
        assert expected[3]["clipfrac"] > 0  # the clip acted: its zero gradients are compared
    if LOSSES[method].vocab_kl:
        assert expected[3]["kl"] > 1e-5  # the whole-vocabulary anchor acted
    for path, settings in PATHS.items():
        for micro in (0, 3):  # the whole minibatch, or micro-batches of 3 rows and 1
            _assert_same(_step(_wrap(model, **settings), batch, method, micro), expected)


@pytest.mark.parametrize("method", list(LOSSES))
def test_every_speed_path_equals_the_reference_with_lora(method, monkeypatch):
    monkeypatch.setattr(speed, "CHUNK_ELEMENTS", 2 * 3 * 61)  # several chunks a micro-batch
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 2 * 3 * 61)
    model = build_model("llama")
    batch = _batch()

    def lora(**settings):
        torch.manual_seed(3)
        lm = _wrap(model, **settings).add_lora(r=4)
        with torch.no_grad():  # an adapter away from its zero start: it changes the outputs
            for n, p in lm.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(4))
        return lm

    expected = _step(lora(speed=False), batch, method, 0)
    if LOSSES[method].vocab_kl:
        assert expected[3]["kl"] > 1e-5  # the adapter-off reference is away from the model
    for settings in PATHS.values():
        _assert_same(_step(lora(**settings), batch, method, 2), expected)


def test_speed_settings_need_the_speed_paths():
    with pytest.raises(ValueError, match="speed paths"):
        _wrap(build_model("llama"), speed=False, fused_head=True)
