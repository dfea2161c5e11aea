"""The fused output-head path (gradients computed chunk by chunk in the forward pass) gives the same
loss, log-probs, entropies and gradients as token_logprobs + autograd, for every loss, and the same
training run."""
import pytest
import torch

from conftest import addition_rows, tiny_lm
from minipsft.fused import fused_head_loss, objective_terms
from minipsft.losses import LOSSES
from minipsft.model import CausalLM
from minipsft.speed import token_logprobs
from minipsft.train import Objective, TrainConfig, train


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["sft", "psft", "dft", "sft_kl"])
@pytest.mark.parametrize("chunk", [None, 2 * 8 * 60])  # one chunk, or a few positions per chunk
def test_fused_head_loss_equals_autograd_through_the_logits(method, chunk):
    lm = tiny_lm()
    batch = lm.collate(lm.encode(addition_rows(8)))
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    cfg = TrainConfig(method=method, eps_high=0.05, kl_coef=0.5)
    g = torch.Generator().manual_seed(1)
    # a pi_old / pi_ref that differs from the model, so that the clip and the KL act
    other = (token_logprobs(lm.model, ids, attn)[0].detach()
             - 0.3 * torch.rand(ids.shape, generator=g)) * attn

    logp, ent = token_logprobs(lm.model, ids, attn, with_entropy=True, chunk_elements=chunk)
    objective = Objective(LOSSES[method], cfg, mask.float(), other, other)
    loss, metrics = objective(logp)
    loss.backward()
    expected = _grads(lm.model)
    lm.model.zero_grad()

    terms = objective_terms(objective)
    f_loss, f_logp, f_ent = fused_head_loss(lm.model, ids, attn, mask, terms, True, chunk)
    f_loss.backward()
    got = _grads(lm.model)
    torch.testing.assert_close(f_loss, loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(f_logp, logp.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(f_ent, ent, atol=1e-5, rtol=1e-5)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)
    if method == "psft":
        assert metrics["clipfrac"] > 0  # the clip acted, so its zero gradients were compared too


@pytest.mark.parametrize("method, settings", [
    ("psft", {}),
    ("psft", {"micro_batch_size": 1}),  # gradient accumulation over micro-batches
    ("psft", {"refresh_pi_old": False}),  # pi_old anchored to the starting model
    ("sft_kl", {"micro_batch_size": 3}),
    ("dft", {}),
    ("psft", {"loss_aggregation": "seq_mean_token_mean", "micro_batch_size": 2}),
])
def test_training_through_the_fused_head_equals_the_default_path(method, settings):
    # prompts of very different lengths: much padding, where log-probs must stay masked
    rows = [{"prompt": "1+" * (i % 5 + 1) + "1=", "completion": str(i % 5 + 2)} for i in range(16)]
    runs = []
    for fused in (False, True):
        base = tiny_lm()
        lm = CausalLM(base.model, base.tokenizer, device="cpu", fused_head=fused)
        cfg = TrainConfig(method=method, epochs=2, lr=3e-2, batch_size=8, minibatch_size=4,
                          progress=False, **settings)
        runs.append((lm, train(lm, lm.encode(rows), cfg)["history"]))
    (a, hist_a), (b, hist_b) = runs
    if method == "psft":
        assert max(r["clipfrac"] for r in hist_b) > 0
    for ra, rb in zip(hist_a, hist_b):
        for key in ("loss", "nll", "entropy", "clipfrac", "ratio_max", "kl"):
            if ra[key] is None:  # a metric this loss does not have
                assert rb[key] is None, key
            else:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), key
    # float32 sums in another order, then Adam at lr 3e-2 for 8 steps: close, not equal
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-3, rtol=1e-2)
