"""GPU checks (skipped without CUDA): bf16 by default, chunked log-probs in bf16, the training loop
and generation on the device, the one-step-per-snapshot identity on GPU, compiled = eager, GRPO, fused AdamW
and the vocabulary chunks kept for backward when they fit."""
import pytest
import torch

from conftest import addition_rows, tiny_lm
from minipsft.model import CausalLM
from minipsft.speed import token_logprobs
from minipsft.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _on_gpu(dtype=None):
    lm = tiny_lm()
    return CausalLM(lm.model, lm.tokenizer, device="cuda", dtype=dtype)


def test_gpu_defaults_to_bf16_and_chunked_logprobs_match():
    lm = _on_gpu()
    assert lm.model.dtype == torch.bfloat16 and lm.device.type == "cuda"
    batch = lm.collate(lm.encode(addition_rows(8)))
    ids, attn = batch["input_ids"], batch["attention_mask"]
    full, ent_full = token_logprobs(lm.model, ids, attn, with_entropy=True)
    chunked, ent_chunked = token_logprobs(lm.model, ids, attn, with_entropy=True, chunk_elements=8 * 3 * len(lm.tokenizer))
    assert full.dtype == torch.float32  # log-probs in float32 even from a bf16 model
    torch.testing.assert_close(full, chunked, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent_full, ent_chunked, atol=1e-4, rtol=1e-4)


def test_psft_trains_on_gpu_and_clips():
    lm = _on_gpu()
    examples = lm.encode(addition_rows(64))
    hist = train(lm, examples, TrainConfig(method="psft", epochs=2, lr=3e-3, batch_size=32, minibatch_size=4,
                                           progress=False))["history"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    assert max(r["clipfrac"] for r in hist) > 0
    out = lm.generate(["1+1=", "20+3="], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_one_step_per_snapshot_is_sft_on_gpu():
    a, b = _on_gpu(torch.float32), _on_gpu(torch.float32)
    examples = a.encode(addition_rows(32))
    cfg = dict(epochs=1, lr=3e-3, batch_size=8, minibatch_size=8, progress=False)
    train(a, examples, TrainConfig(method="sft", **cfg))
    train(b, examples, TrainConfig(method="psft", **cfg))
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_grpo_runs_on_gpu_and_raises_the_reward():
    from minipsft.lab.rl import GRPOConfig, grpo

    lm = CausalLM(tiny_lm(chat=False).model, tiny_lm(chat=False).tokenizer, device="cuda", dtype="float32")
    prompts = [{"prompt": w + ":"} for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")]
    res = grpo(lm, prompts, lambda row, text: float(text[:1].isdigit()),
               GRPOConfig(steps=30, prompts_per_step=8, group_size=8, minibatch_size=16, max_new_tokens=3, lr=1e-2,
                          progress=False))
    h = res["history"]
    assert sum(x["reward"] for x in h[-5:]) / 5 > sum(x["reward"] for x in h[:5]) / 5 + 0.3


def test_compiled_layers_match_eager_on_gpu():
    lm = _on_gpu()
    compiled = CausalLM(tiny_lm().model, lm.tokenizer, device="cuda", compile=True)
    batch = lm.collate(lm.encode(addition_rows(8)))
    torch.testing.assert_close(compiled.token_logprobs(batch)[0], lm.token_logprobs(batch)[0], atol=2e-2, rtol=2e-2)
    hist = train(compiled, compiled.encode(addition_rows(16)), TrainConfig(method="psft", epochs=2, lr=1e-2, batch_size=8,
                                                                           minibatch_size=4, progress=False))["history"]
    assert max(h["clipfrac"] for h in hist) > 0


def test_gpu_fuses_adamw_and_keeps_the_vocabulary_chunks_when_they_fit():
    from minipsft.train import adamw

    lm = _on_gpu()
    assert adamw(lm.model.parameters(), 1e-3, 0.1).defaults["fused"] is True
    batch = lm.collate(lm.encode(addition_rows(8)))
    with torch.no_grad():  # the one-time check of the fast head against the model's logits, first
        token_logprobs(lm.model, batch["input_ids"][:1], batch["attention_mask"][:1])
    calls = []
    hook = lm.model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    T1 = batch["input_ids"].shape[1] - 1
    logp, _ = token_logprobs(lm.model, batch["input_ids"], batch["attention_mask"],
                             chunk_elements=8 * len(lm.tokenizer))
    logp.sum().backward()  # a tiny model's logits fit: each one-position chunk projected once
    hook.remove()
    assert len(calls) == T1


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("method", ["sft", "psft"])
def test_fused_head_matches_the_chunked_path_on_gpu(method, compile):
    from minipsft.fused import fused_head_loss, objective_terms
    from minipsft.losses import LOSSES
    from minipsft.train import Objective

    lm = CausalLM(tiny_lm().model, tiny_lm().tokenizer, device="cuda", compile=compile,
                  fused_head=True)
    batch = lm.collate(lm.encode(addition_rows(16)))
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    cfg = TrainConfig(method=method, eps_high=0.05)
    with torch.no_grad():
        noise = 0.2 * torch.rand(ids.shape, device="cuda")
        old = (token_logprobs(lm.model, ids, attn)[0] - noise) * attn
    chunk = 16 * 3 * len(lm.tokenizer)  # three positions per chunk: several chunks
    logp, ent = token_logprobs(lm.model, ids, attn, with_entropy=True, chunk_elements=chunk,
                               compile=lm.compile)
    objective = Objective(LOSSES[method], cfg, mask.float(), old, None)
    loss, _ = objective(logp)
    loss.backward()
    expected = [p.grad.float().clone() for p in lm.model.parameters()]
    lm.model.zero_grad()
    terms = objective_terms(objective)
    f_loss, f_logp, f_ent = fused_head_loss(lm.model, ids, attn, mask, terms, True, chunk,
                                            compile=lm.compile)
    f_loss.backward()
    torch.testing.assert_close(f_loss, loss.detach(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(f_logp, logp.detach(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(f_ent, ent, atol=2e-2, rtol=2e-2)
    for p, g in zip(lm.model.parameters(), expected):  # bf16 gradients: relative error of the whole
        assert (p.grad.float() - g).norm() <= 2e-2 * g.norm() + 1e-6
