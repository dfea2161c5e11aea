"""The fused output-head path (gradients computed chunk by chunk in the forward pass) gives the same
loss, log-probs, entropies and gradients as token_logprobs + autograd, for every loss, and the same
training run."""
import pytest
import torch

from conftest import addition_rows, tiny_lm
from minipsft.model import CausalLM, fused_head_loss, token_logprobs
from minipsft.train import TrainConfig, _loss, _token_terms, train


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
    loss, metrics = _loss(method, cfg, logp, mask, other, other)
    loss.backward()
    expected = _grads(lm.model)
    lm.model.zero_grad()

    terms = _token_terms(method, cfg, other, other)
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


def test_training_through_the_fused_head_equals_the_default_path():
    rows = addition_rows(16)
    runs = []
    for fused in (False, True):
        base = tiny_lm()
        lm = CausalLM(base.model, base.tokenizer, device="cpu", fused_head=fused)
        cfg = TrainConfig(method="psft", epochs=2, lr=3e-2, batch_size=8, minibatch_size=2,
                          progress=False)
        runs.append((lm, train(lm, lm.encode(rows), cfg)["history"]))
    (a, hist_a), (b, hist_b) = runs
    assert max(r["clipfrac"] for r in hist_b) > 0
    for ra, rb in zip(hist_a, hist_b):
        for key in ("loss", "nll", "entropy", "clipfrac", "ratio_max"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), key
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-4, rtol=1e-3)
