"""One small wrapper over a Hugging Face causal LM and its tokenizer: what fine-tuning needs of a
model, and nothing else. Load (hub id or local folder), build from a config, ``save_pretrained``
so that plain transformers reloads it; ``encode`` rows (chat.py); ``token_logprobs``, the plain
reference path (logprobs.py) or, with ``speed=True``, the speed paths (speed.py, fused.py);
batched ``generate``. CPU (float32) or GPU (bfloat16); nothing here needs a GPU to import or test.
"""
import copy
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from . import chat, fused, gguf, logprobs, lora, speed
from .speed import compile_layers, decoder_hidden, fast_head, token_logprobs as fast_token_logprobs
from .devices import resolve_device, resolve_dtype
from .errors import ModelLoadError, load_problem, local_problem

__all__ = ["CausalLM", "Reference"]


class CausalLM:
    """A causal LM plus its tokenizer, on one device, with the few operations fine-tuning needs.

    ``speed`` turns the speed paths on (the default): log-probs from the hidden states chunk by
    chunk (``keep_logits``: keep each chunk's logits for backward, None = when the GPU has room),
    ``compile`` (each decoder layer and the chunks; True = inductor, or a backend's name) and
    ``fused_head`` (the loss's gradient in the forward pass; less memory, slower when compiled on
    one H200: results/gpu/README.md). ``speed=False`` is the plain reference path."""

    def __init__(self, model, tokenizer, device=None, dtype=None,
                 gradient_checkpointing: bool = False, compile: bool | str = False,
                 keep_logits: bool | None = None, fused_head: bool | None = None,
                 speed: bool = True):
        if not speed and (compile or fused_head or keep_logits is not None):
            raise ValueError("compile, keep_logits and fused_head are speed paths: "
                             "they need speed=True")
        self.device = resolve_device(device)
        self.model = model.to(device=self.device, dtype=resolve_dtype(dtype, self.device))
        self.tokenizer = tokenizer
        self.speed, self.keep_logits, self.fused_head = speed, keep_logits, bool(fused_head)
        self.compile = ("inductor" if compile is True else compile) or None
        if gradient_checkpointing:  # recompute each layer in backward: activations ~ one layer
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                self.model.activation_checkpointing_enable()
            else:
                self.model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.compile:
            compile_layers(self.model, self.compile)
        if tokenizer.pad_token_id is None:
            # many chat models ship without one; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, attn_implementation="sdpa",
                        **settings):
        """Load from a hub id, a folder written by ``save_pretrained``, a GGUF file or a packaged
        model's short name (gguf.py: ``smollm2-135m``); a model that cannot be loaded raises
        ``ModelLoadError`` with a one-line reason. ``settings``: the
        constructor's (``compile``, ``speed``, ...) and transformers' ``from_pretrained``'s."""
        own = {k: settings.pop(k) for k in ("gradient_checkpointing", "compile", "keep_logits",
                                            "fused_head", "speed") if k in settings}
        dev = resolve_device(device)
        name_or_path = gguf.plain_folder(name_or_path) or name_or_path
        problem = local_problem(str(name_or_path))
        if problem:
            raise ModelLoadError(problem)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=resolve_dtype(dtype, dev),
                attn_implementation=attn_implementation, **settings)
        except OSError as e:  # transformers' "not found / cannot connect" errors are OSErrors
            raise ModelLoadError(load_problem(str(name_or_path), e)) from e
        return cls(model, tokenizer, dev, dtype, **own)

    @classmethod
    def from_config(cls, config, tokenizer, seed: int = 0, device=None, dtype=None, **settings):
        """A freshly initialised model of any transformers architecture (tiny ones for tests and
        the toy world); ``settings`` as the constructor's."""
        torch.manual_seed(seed)
        return cls(AutoModelForCausalLM.from_config(config), tokenizer, device, dtype, **settings)

    def save_pretrained(self, path):
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def add_lora(self, r: int = 16, alpha: float | None = None, dropout: float = 0.0,
                 target_modules="all-linear"):
        """Wrap the model with a fresh LoRA adapter (lora.py); only the adapter trains."""
        self.model = lora.add_lora(self.model, r, alpha, dropout, target_modules)
        return self

    @property
    def is_lora(self) -> bool:
        return lora.is_lora(self.model)

    def save_merged(self, path):
        """Merge the LoRA adapter into the weights, in place (no second copy of the model in
        memory; the model has no adapter afterwards), and save it (plain transformers loads it)."""
        self.model = self.model.merge_and_unload()
        self.save_pretrained(path)

    def reference(self) -> "Reference":
        """The weights as they are now, frozen for later: pi_ref of the anchored losses, or an
        anchored pi_old."""
        return Reference(self)

    def frozen_copy(self):
        """A gradient-free copy of the current weights."""
        model = copy.deepcopy(self.model).eval()
        model.requires_grad_(False)
        return model

    @property
    def hf_model(self):
        """The transformers model itself (under a PEFT wrapper, its base model)."""
        wrapped = hasattr(self.model, "get_base_model")
        return self.model.get_base_model() if wrapped else self.model

    # ---------------------------------------------------------------- encoding and scoring
    @property
    def max_length(self) -> int:
        return getattr(self.model.config, "max_position_embeddings", None) or 2048

    def encode(self, rows, max_length=None, all_assistant_turns: bool = False) -> list:
        """Rows -> examples ``{"input_ids", "completion_mask"}`` (chat.encode); ``max_length``
        defaults to the model's context."""
        return chat.encode(self.tokenizer, rows, max_length or self.max_length, all_assistant_turns)

    def prompt_ids(self, prompt) -> list:
        """Token ids of a prompt, as ``encode`` and ``generate`` tokenise it (chat.prompt_ids)."""
        return chat.prompt_ids(self.tokenizer, prompt)

    def collate(self, examples) -> dict:
        """Right-pad a list of examples into tensors on the model's device."""
        return chat.collate(self.tokenizer, examples, self.device)

    def token_logprobs(self, batch, with_entropy: bool = False, model=None):
        """Per-token log-probs (and entropies) of a collated batch under this model (or another
        one, e.g. a frozen copy): the speed paths' when on, else the reference path's."""
        model = model if model is not None else self.model
        if not self.speed:
            return logprobs.token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                           with_entropy)
        return fast_token_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                   with_entropy, keep_logits=self.keep_logits,
                                   compile=self.compile)

    def token_logprobs_kl(self, batch, reference: "Reference"):
        """``(logp, entropy, kl)``: ``token_logprobs``'s, and at each position the whole-vocabulary
        ``KL(pi_ref || pi)`` to ``reference`` (logprobs.token_logprobs_kl); chunk by chunk on the
        speed paths, from the reference's hidden states (speed.token_logprobs_kl)."""
        ids, attn = batch["input_ids"], batch["attention_mask"]
        with reference.weights() as ref:  # no grad: pi_ref is a constant of the loss
            head = fast_head(ref) if self.speed and fast_head(self.model) is not None else None
            if head is None:
                ref_logits = ref(input_ids=ids, attention_mask=attn, use_cache=False).logits
            else:
                ref_hidden = decoder_hidden(ref, ids, attn)
        if head is None:
            return logprobs.token_logprobs_kl(self.model, ids, attn, ref_logits)
        return speed.token_logprobs_kl(self.model, ids, attn, ref_hidden, head,
                                       keep_logits=self.keep_logits, compile=self.compile)

    def fused_loss(self, batch, objective):
        """``(loss, logp, entropy, metrics)`` of a ``train.Objective`` through the fused head."""
        return fused.objective_loss(self, batch, objective)

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
                 top_k: int = 0) -> list:
        """Completions (decoded text, special tokens dropped) for a list of prompts (strings or
        message lists). Greedy (argmax) unless ``do_sample``; see ``sample_ids``.

        Prompts are encoded exactly as in ``encode`` and left-padded, so a completion continues the
        same token sequence the model was trained on.
        """
        pairs = self.sample_ids(prompts, max_new_tokens, do_sample, temperature, top_p, batch_size,
                                top_k)
        return self.tokenizer.batch_decode([c for _, c in pairs], skip_special_tokens=True)

    def _generation_config(self, max_new_tokens, do_sample, temperature, top_p, top_k):
        """Exactly the decoding asked for: argmax, or sampling at ``temperature`` with ``top_p`` and
        ``top_k`` (0 = no top-k); no repetition penalty or other processor from a hub model's
        ``generation_config`` (Qwen2.5-Instruct ships top_k 20, temperature 0.7 and a penalty)."""
        tok = self.tokenizer
        special = dict(pad_token_id=tok.pad_token_id, eos_token_id=self._stop_ids(),
                       bos_token_id=tok.bos_token_id, max_new_tokens=max_new_tokens, num_beams=1,
                       repetition_penalty=1.0, no_repeat_ngram_size=0)
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
        return GenerationConfig(do_sample=do_sample, **sampling, **special)

    def _stop_ids(self) -> list:
        """The tokenizer's EOS and any end tokens the model's generation_config lists (Llama-3's
        ``<|eot_id|>``, Gemma's ``<end_of_turn>``): generation stops at any of them."""
        hf_model = self.hf_model
        listed = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
        listed = [listed] if isinstance(listed, int) else list(listed or [])
        eos = self.tokenizer.eos_token_id
        return ([eos] if eos is not None else []) + [i for i in listed if i != eos]

    @torch.no_grad()
    def sample_ids(self, prompts, max_new_tokens: int = 64, do_sample: bool = True,
                   temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
                   top_k: int = 0) -> list:
        """``(prompt_ids, completion_ids)`` per prompt: the exact tokens generated, up to and
        including EOS (no padding), so an RL step scores what was sampled, not a re-tokenisation of
        its text. Decoding follows the arguments only, never the model's ``generation_config``."""
        tok, out = self.tokenizer, []
        was_training = self.model.training
        self.model.eval()
        config = self._generation_config(max_new_tokens, do_sample, temperature, top_p, top_k)
        stops = set(config.eos_token_id)
        # generate() fills what a config leaves unset from the model's own generation_config:
        # hand it a blank one for the call
        hf_model = self.hf_model
        saved, hf_model.generation_config = hf_model.generation_config, GenerationConfig()
        try:
            for s in range(0, len(prompts), batch_size):
                enc = [chat.prompt_ids(tok, p) for p in prompts[s:s + batch_size]]
                T = max(map(len, enc))
                ids = torch.tensor([[tok.pad_token_id] * (T - len(e)) + e for e in enc],
                                   device=self.device)
                attn = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in enc],
                                    device=self.device)
                gen = self.model.generate(input_ids=ids, attention_mask=attn,
                                          generation_config=config)
                for e, row in zip(enc, gen[:, T:].tolist()):
                    end = next((k for k, t in enumerate(row) if t in stops), None)
                    if end is not None:  # after a stop token, generate fills with padding
                        row = row[:end + 1]
                    out.append((e, row))
        finally:
            hf_model.generation_config = saved
        self.model.train(was_training)
        return out


class Reference:
    """The starting weights, frozen: the model itself with its LoRA adapter switched off when the
    adapter is still at its zero start (no copy: as the ASFT code takes its reference), else a
    gradient-free copy of the model."""

    def __init__(self, lm: CausalLM):
        self.lm = lm
        self.copy = None if lora.fresh_adapter(lm.model) else lm.frozen_copy()

    @contextmanager
    def weights(self):
        """The reference model, under no grad (and, for LoRA, with the adapter off)."""
        with torch.no_grad():
            if self.copy is not None:
                yield self.copy
            else:
                with self.lm.model.disable_adapter():
                    yield self.lm.model

    def logprobs(self, batch):
        """``log pi_ref(target)`` [B, T] of a collated batch."""
        with self.weights() as model:
            return self.lm.token_logprobs(batch, model=model)[0]
