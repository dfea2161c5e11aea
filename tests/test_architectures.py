"""token_logprobs equals the model's own log-softmax, with the same gradients, for architectures
that scale or cap their logits and for plain ones; a head that would differ is caught and the
model's own logits are used instead."""
import pytest
import torch
import transformers as T

from minipsft import logprobs
from minipsft.speed import ScaledHead, fast_head, token_logprobs

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**SMALL),
    "qwen2": lambda: T.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "granite": lambda: T.GraniteConfig(**SMALL, logits_scaling=8.0),
    "cohere": lambda: T.CohereConfig(**SMALL, logit_scale=0.0625),
    "gemma2": lambda: T.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=3.0),
    "phi3": lambda: T.Phi3Config(**SMALL, pad_token_id=0),
    "gpt2": lambda: T.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4),
}


def build_model(name):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()  # no dropout (gpt2)
    with torch.no_grad():  # logits far from uniform, so that a missing scale or cap shows
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (3, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 9:] = 0  # padding on the right
    return ids, attn


def _reference(model, ids, attn):
    return logprobs.token_logprobs(model, ids, attn)[0]  # the model's own logits, plainly


@pytest.mark.parametrize("name", list(CONFIGS))
def test_token_logprobs_and_gradients_equal_the_models_own(name):
    model = build_model(name)
    ids, attn = _batch()
    head = fast_head(model)
    assert head is not None  # the chunked fast path is exact for every one of these
    scaled = name in ("granite", "cohere", "gemma2")
    assert isinstance(head, ScaledHead) == scaled
    ref = _reference(model, ids, attn)
    (ref * torch.arange(12.0)).sum().backward()  # position weights: gradients of every token
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logp, _ = token_logprobs(model, ids, attn, chunk_elements=3 * 2 * 61)  # several chunks
    (logp * torch.arange(12.0)).sum().backward()
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        if n in expected:  # float32 rounding only: relative to each gradient's size
            assert (p.grad - expected[n]).norm() <= 1e-5 * expected[n].norm() + 1e-7, n


def test_a_head_that_would_differ_falls_back_to_the_models_logits():
    model = build_model("llama")

    class Doubled(type(model)):  # an architecture whose forward does more than its config says
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    model.__class__ = Doubled
    ids, attn = _batch()
    assert fast_head(model) is None
    torch.testing.assert_close(token_logprobs(model, ids, attn)[0], _reference(model, ids, attn),
                               atol=1e-5, rtol=1e-5)
