"""Shared fixtures: a tiny Qwen2-architecture model with a char tokenizer and ChatML template,
built from a config inside the tests (no hub), and a small prompt-completion data set."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # CPU results are deterministic per thread count

from minipsft.char_tokenizer import char_tokenizer
from minipsft.model import CausalLM  # noqa: E402

ALPHABET = "0123456789+=-:, abcdefghijklmnopqrstuvwxyz\n"


def tiny_lm(seed=0, chat=True, layers=2, hidden=32, max_positions=64):
    from transformers import Qwen2Config

    tok = char_tokenizer(ALPHABET, "chatml" if chat else None)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    return CausalLM.from_config(cfg, tok, seed=seed, device="cpu")


def addition_rows(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


@pytest.fixture
def lm():
    return tiny_lm()


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_lm().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory):
    """One base-model cache for every test that runs the smoke preset: its base is pretrained
    once per session (deterministic: the same weights as a fresh pretraining)."""
    return tmp_path_factory.mktemp("smoke_cache")
