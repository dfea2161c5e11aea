"""Model wrapper: save/load, encoding and masks, chunked log-probs and entropy, generation."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import addition_rows, tiny_lm
from minipsft.errors import DataError
from minipsft.model import CausalLM
from minipsft.speed import fast_head, token_logprobs


def test_save_pretrained_reloads_with_plain_transformers(lm, tmp_path):
    lm.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok("12+3=15")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, lm.model(ids).logits)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    again = CausalLM.from_pretrained(tmp_path, device="cpu")
    assert again.model.dtype == torch.float32 and again.device.type == "cpu"


def test_encode_prompt_completion_masks_only_completion_and_eos(lm):
    (ex,) = lm.encode([{"prompt": "12+3=", "completion": "15"}])
    tok = lm.tokenizer
    assert ex["input_ids"] == tok("12+3=")["input_ids"] + tok("15")["input_ids"] + [tok.eos_token_id]
    assert ex["completion_mask"] == [0] * 5 + [1, 1, 1]


def test_encode_messages_uses_chat_template(lm):
    rows = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]},
            {"prompt": [{"role": "user", "content": "1+1="}], "completion": [{"role": "assistant", "content": "2"}]}]
    a, b = lm.encode(rows)
    assert a == b
    completion = [t for t, m in zip(a["input_ids"], a["completion_mask"]) if m]
    prompt = [t for t, m in zip(a["input_ids"], a["completion_mask"]) if not m]
    assert lm.tokenizer.decode(completion) == "2<|im_end|>\n"
    assert lm.tokenizer.decode(prompt) == "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n"


def test_encode_messages_without_template_falls_back_to_plain_roles():
    lm = tiny_lm(chat=False)
    (ex,) = lm.encode([{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}])
    prompt = [t for t, m in zip(ex["input_ids"], ex["completion_mask"]) if not m]
    assert lm.tokenizer.decode(prompt) == "user: 1+1=\nassistant: "


def test_completion_truncated_away_is_reported_with_its_row(lm):
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "1" * 20, "completion": "2"}]
    with pytest.raises(DataError, match=r"row 2: completion truncated away \(prompt has 20 tokens, max_length is 10\)"):
        lm.encode(rows, max_length=10)
    with pytest.warns(UserWarning, match="1 of 1 completions were shortened"):
        (ex,) = lm.encode([{"prompt": "1+1=", "completion": "22222222"}], max_length=6)
    assert len(ex["input_ids"]) == 6 and sum(ex["completion_mask"]) == 2


def test_collate_pads_right_and_masks_padding(lm):
    batch = lm.collate(lm.encode([{"prompt": "1+1=", "completion": "2"}, {"prompt": "10+10=", "completion": "20"}]))
    assert batch["input_ids"].shape == (2, 9)  # "10+10=" + "20" + EOS
    assert batch["attention_mask"].tolist()[0] == [1] * 6 + [0] * 3
    assert (batch["input_ids"][0, 6:] == lm.tokenizer.pad_token_id).all()
    assert batch["completion_mask"].sum().item() == 2 + 3


def _naive(model, ids, attn):
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    logp_all = logits.log_softmax(-1)
    logp = logp_all[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)[:, :-1]
    keep = attn[:, 1:].bool()
    return logp.masked_fill(~keep, 0), ent.masked_fill(~keep, 0)


@pytest.mark.parametrize("chunk_elements,keep_logits", [(2**25, None), (3 * 32 * 2, False), (3 * 32 * 2, True)])
def test_token_logprobs_and_entropy_match_full_log_softmax(lm, chunk_elements, keep_logits):
    """One chunk, or two positions per chunk with the chunks' logits recomputed in backward or kept."""
    batch = lm.collate(lm.encode([{"prompt": "1+1=", "completion": "2"}, {"prompt": "10+10=", "completion": "20"}]))
    ids, attn = batch["input_ids"], batch["attention_mask"]
    logp, ent = token_logprobs(lm.model, ids, attn, with_entropy=True, chunk_elements=chunk_elements,
                               keep_logits=keep_logits)
    ref_logp, ref_ent = _naive(lm.model, ids, attn)
    assert logp.shape == ids.shape and ent.shape == ids.shape
    assert (logp[:, 0] == 0).all() and (logp[0, 6:] == 0).all()
    torch.testing.assert_close(logp[:, 1:], ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[:, 1:], ref_ent, atol=1e-5, rtol=1e-5)
    # gradients agree too (whether the chunks' logits were kept or recomputed in backward)
    (logp * batch["completion_mask"]).sum().backward()
    g = [p.grad.clone() for p in lm.model.parameters()]
    lm.model.zero_grad()
    (ref_logp * batch["completion_mask"][:, 1:]).sum().backward()
    for a, p in zip(g, lm.model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keep_logits,head_calls", [(False, 2 * 4), (True, 4), (None, 2 * 4)])  # None: CPU recomputes
def test_keep_logits_decides_whether_backward_recomputes_the_vocabulary_projection(lm, keep_logits, head_calls):
    batch = lm.collate(lm.encode([{"prompt": "1+1=", "completion": "2"}, {"prompt": "10+10=", "completion": "20"}]))
    fast_head(lm.model)  # its one-time check against the model's own logits runs the head too
    calls = []
    hook = lm.model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:  # 8 target positions, 2 per chunk: 4 chunks, each projected once forward (and once more if recomputed)
        logp, _ = token_logprobs(lm.model, batch["input_ids"], batch["attention_mask"],
                                 chunk_elements=2 * 2 * len(lm.tokenizer), keep_logits=keep_logits)
        logp.sum().backward()
    finally:
        hook.remove()
        lm.model.zero_grad()
    assert len(calls) == head_calls


def test_generate_batched_equals_one_by_one(lm):
    prompts = ["1+1=", "10+20=", [{"role": "user", "content": "2+2="}]]
    batched = lm.generate(prompts, max_new_tokens=5)
    single = [lm.generate([p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single and all(isinstance(s, str) for s in batched)
    torch.manual_seed(0)
    sampled = lm.generate(prompts[:1] * 4, max_new_tokens=5, do_sample=True)
    assert len(sampled) == 4


def test_compiled_layers_give_the_same_logprobs_and_training():
    """Regional torch.compile of the decoder layers (backend aot_eager here: no C++ toolchain needed;
    tests/test_gpu.py runs inductor) changes nothing in the numbers."""
    from minipsft.model import CausalLM
    from minipsft.train import TrainConfig, train

    eager = tiny_lm()
    compiled = CausalLM(tiny_lm().model, eager.tokenizer, compile="aot_eager")
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
               for layer in compiled.model.get_decoder().layers)
    batch = eager.collate(eager.encode(addition_rows(8)))
    torch.testing.assert_close(compiled.token_logprobs(batch)[0], eager.token_logprobs(batch)[0], atol=1e-5, rtol=1e-5)
    examples = eager.encode(addition_rows(16))
    cfg = TrainConfig(method="psft", epochs=1, lr=1e-2, batch_size=8, minibatch_size=4, progress=False)
    a, b = train(eager, examples, cfg)["history"], train(compiled, examples, cfg)["history"]
    assert [round(x["loss"], 5) for x in a] == [round(x["loss"], 5) for x in b]


@pytest.fixture(scope="module")
def hostile_model_dir(tmp_path_factory):
    """A tiny model saved with a generation_config that would change every decoding if followed."""
    from transformers import GenerationConfig

    path = tmp_path_factory.mktemp("hostile")
    lm = tiny_lm(seed=3)
    lm.model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.1, top_k=2, top_p=0.5, min_p=0.5, repetition_penalty=5.0,
        no_repeat_ngram_size=1, suppress_tokens=list(range(6, len(lm.tokenizer))))
    lm.save_pretrained(path)
    return path


def test_greedy_decoding_is_the_argmax_whatever_the_generation_config(hostile_model_dir):
    lm = CausalLM.from_pretrained(hostile_model_dir, device="cpu")
    assert lm.model.generation_config.repetition_penalty == 5.0  # it was saved and loaded
    prompts = ["1+1=", "23+4=", "abc"]
    got = lm.sample_ids(prompts, max_new_tokens=8, do_sample=False)
    for prompt, (prompt_ids, completion) in zip(prompts, got):
        ids = list(prompt_ids)
        expected = []
        for _ in range(8):  # a hand-written argmax decode
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
            nxt = int(logits.argmax())
            expected.append(nxt)
            ids.append(nxt)
            if nxt == lm.tokenizer.eos_token_id:
                break
        assert completion == expected, prompt
    assert lm.model.generation_config.repetition_penalty == 5.0  # restored after the call


def test_sampling_follows_the_models_softmax_whatever_the_generation_config(hostile_model_dir):
    lm = CausalLM.from_pretrained(hostile_model_dir, device="cpu")
    torch.manual_seed(0)
    n = 4000
    pairs = lm.sample_ids(["1+1="] * n, max_new_tokens=1, do_sample=True, batch_size=1000)
    counts = torch.bincount(torch.tensor([c[0] for _, c in pairs]), minlength=len(lm.tokenizer))
    with torch.no_grad():
        ids = torch.tensor([lm.prompt_ids("1+1=")])
        probs = lm.model(input_ids=ids).logits[0, -1].float().softmax(-1)
    total_variation = 0.5 * (counts / n - probs[:len(counts)]).abs().sum()
    assert (counts > 0).sum() > 10 and total_variation < 0.1  # top_k 2 or temperature 0.1: ~0.9
    top2 = lm.sample_ids(["1+1="] * 200, max_new_tokens=1, do_sample=True, top_k=2)
    assert len({c[0] for _, c in top2}) <= 2  # asked-for truncation still works
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0, -1].float()
    hot = lm.sample_ids(["1+1="] * n, max_new_tokens=1, do_sample=True, temperature=0.2,
                        batch_size=1000)  # exactly the asked-for temperature: softmax(logits / 0.2)
    counts = torch.bincount(torch.tensor([c[0] for _, c in hot]), minlength=len(lm.tokenizer))
    sharp = (logits / 0.2).softmax(-1)
    assert 0.5 * (sharp - probs).abs().sum() > 0.2  # the two distributions are far apart
    assert 0.5 * (counts / n - sharp[:len(counts)]).abs().sum() < 0.1
    ranked, order = probs.sort(descending=True)
    nucleus = set(order[:int((ranked.cumsum(0) < 0.5).sum()) + 1].tolist())  # smallest set >= 0.5
    top_p = lm.sample_ids(["1+1="] * 400, max_new_tokens=1, do_sample=True, top_p=0.5)
    assert {c[0] for _, c in top_p} <= nucleus and len(nucleus) > 1


# A ChatML-like template with a default system prompt (as Qwen2.5's) and TRL's generation markers
SYSTEM_DEFAULT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}<|im_start|>system\nbe brief<|im_end|>\n{% endif %}"
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"},
                             {"role": "user", "content": "2+3="}, {"role": "assistant", "content": "5"}]}


def _trained_text(lm, example):
    ids = [i for i, m in zip(example["input_ids"], example["completion_mask"]) if m]
    return lm.tokenizer.decode(ids)


def test_every_assistant_turn_or_the_last_under_a_template_with_a_default_system_prompt():
    lm = tiny_lm(max_positions=256)
    lm.tokenizer.chat_template = SYSTEM_DEFAULT_TEMPLATE
    last = lm.encode([CONVERSATION])[0]
    every = lm.encode([CONVERSATION], all_assistant_turns=True)[0]
    assert last["input_ids"] == every["input_ids"]  # the same tokens, only the mask differs
    assert _trained_text(lm, last) == "5<|im_end|>"
    assert _trained_text(lm, every) == "2<|im_end|>5<|im_end|>"
    text = lm.tokenizer.decode(every["input_ids"])
    assert text.startswith("<|im_start|>system\nbe brief") and text.count("<|im_start|>user") == 2
    prompt = [m for m in CONVERSATION["messages"][:1]]  # generation continues the same prefix
    head = lm.prompt_ids(prompt)
    assert every["input_ids"][:len(head)] == head


def test_a_template_whose_prompt_is_not_a_prefix_is_an_error_naming_the_row():
    lm = tiny_lm(max_positions=256)
    # the generation prompt says "bot:" while the rendered turn says "assistant:": not a prefix
    lm.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
                                  "{% if add_generation_prompt %}bot:{% endif %}")
    for all_turns in (False, True):
        with pytest.raises(DataError, match=r"row 2: the chat template .* not a prefix"):
            lm.encode([{"prompt": "1+1=", "completion": "2"}, CONVERSATION], all_assistant_turns=all_turns)


def test_generation_stops_at_any_end_token_the_generation_config_lists(tmp_path):
    lm = tiny_lm(seed=3)
    greedy = lm.sample_ids(["1+1="], max_new_tokens=6, do_sample=False)[0][1]
    stop = greedy[2]  # make the third generated token an end-of-turn token, as Llama-3's <|eot_id|>
    lm.model.generation_config.eos_token_id = [lm.tokenizer.eos_token_id, stop]
    stopped = lm.sample_ids(["1+1="], max_new_tokens=6, do_sample=False)[0][1]
    assert stopped == greedy[:greedy.index(stop) + 1]
