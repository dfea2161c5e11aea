"""One small wrapper over a Hugging Face causal LM and its tokenizer.

What fine-tuning needs from a model, and nothing else:
  * load (hub id or local folder) / build from a config / ``save_pretrained`` so plain transformers
    reloads it;
  * ``encode`` rows (prompt-completion or conversational) into token ids and a completion mask;
  * ``token_logprobs``: log pi(x_t | x_<t) of every target token and, optionally, the entropy of
    pi(. | x_<t), computed chunk by chunk from the hidden states so that no full [B, T, V] logits
    tensor is ever built (real vocabularies are 150k wide);
  * batched ``generate`` (greedy or sampled) through transformers.
Runs on CPU (float32) or GPU (bfloat16); nothing here needs a GPU to import or to test.
"""
import copy
import functools
import os
import warnings
import weakref
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .char_tokenizer import char_tokenizer  # noqa: F401
from .devices import resolve_device, resolve_dtype
from .errors import DataError, ModelLoadError
from .errors import load_problem as _load_problem, local_problem as _local_problem

__all__ = ["CausalLM", "DataError", "ModelLoadError", "token_logprobs", "fused_head_loss",
           "fast_head",
           "logit_scale", "ScaledHead",
           "char_tokenizer", "resolve_device", "resolve_dtype"]

# Elements of one [rows, positions, vocab] float32 logits chunk: 2**25 floats (128 MiB) on CPU;
# 2**28 (1 GiB) on GPU, where small chunks leave the vocabulary projection's matmuls too thin to be
# fast.
CHUNK_ELEMENTS = 2**25
CHUNK_ELEMENTS_GPU = 2**28


def _chunk_logprobs(hidden, targets, head, with_entropy: bool):
    # [B, c, V], float32 so that exp(logp - logp_old) is exact enough to clip
    logits = head(hidden).float()
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    if not with_entropy:
        return logp, None
    with torch.no_grad():  # entropy is a diagnostic: H = log Z - sum_v p_v * logit_v
        entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


@functools.cache
def _compiled_chunk_logprobs(backend: str):
    """``_chunk_logprobs`` compiled once per backend: the log-softmax, the gather and the entropy
    fuse into one pass over the chunk's logits instead of several."""
    return torch.compile(_chunk_logprobs, backend=backend, dynamic=True)


def logit_scale(config) -> float:
    """The factor a model multiplies its output head's logits by, read from its config the way
    TRL's trainers read it: Cohere's ``logit_scale``, ``output_multiplier``, Falcon-H1's
    ``lm_head_multiplier``; Granite and MiniCPM3 divide by ``logits_scaling`` (HyperCLOVA X
    multiplies). 1.0 when none is set."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is None:
        return 1.0
    return float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)


class ScaledHead(torch.nn.Module):
    """An output head as such models apply it: the linear map, times a scale (divided by
    ``1 / scale`` where the model divides, as Granite does: the same rounding in bf16), then a soft
    cap (Gemma-2's ``final_logit_softcapping``: ``cap * tanh(logits / cap)``)."""

    def __init__(self, linear: torch.nn.Linear, scale: float = 1.0, softcap: float | None = None,
                 divide: bool = False):
        super().__init__()
        self.linear, self.scale, self.softcap, self.divide = linear, scale, softcap, divide
        self.out_features = linear.out_features

    def forward(self, hidden):
        logits = self.linear(hidden)
        if self.scale != 1.0 and self.divide:
            logits = logits / (1.0 / self.scale)
        elif self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# model -> its head as a function of the decoder's hidden states, or None: checked once per model
_FAST_HEADS = weakref.WeakKeyDictionary()


def fast_head(model):
    """The output head that turns the decoder's last hidden states into exactly the model's own
    logits (a plain ``nn.Linear``, or a ``ScaledHead`` for models that scale or cap logits), or
    None when none does; then log-probs come from the model's own (full) logits.

    Checked once per model on a short input against ``model(...).logits``, so an architecture
    that does something else to its logits (a hidden-state scale, say) is caught, not trusted."""
    if model in _FAST_HEADS:
        return _FAST_HEADS[model]
    head = None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    linear = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is not None and decoder is not model and isinstance(linear, torch.nn.Linear):
        config = model.config.get_text_config()
        scale, cap = logit_scale(config), getattr(config, "final_logit_softcapping", None)
        divide = getattr(config, "logits_scaling", None) is not None and scale != 1.0 and (
            config.model_type != "hyperclovax")
        head = linear if scale == 1.0 and not cap else ScaledHead(linear, scale, cap, divide)
        if not _same_logits(model, decoder, head):
            head = None
    _FAST_HEADS[model] = head
    return head


@torch.no_grad()
def _same_logits(model, decoder, head) -> bool:
    device = next(model.parameters()).device
    ids = (torch.arange(1, 9, device=device) % head.out_features)[None]
    attn = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    own = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
    hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    ours = head(hidden).float()
    model.train(was_training)
    return own.shape == ours.shape and bool((ours - own).abs().max() <= 1e-3 * own.abs().max())


def _hidden_and_head(model, input_ids, attention_mask):
    """The decoder's final hidden states and ``fast_head(model)``, or (the model's own logits,
    identity) when no head reproduces them."""
    head = fast_head(model)
    if head is not None:
        out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False)
        return out.last_hidden_state, head
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits, torch.nn.Identity()


def _logits_fit(hidden, elements: int) -> bool:
    """Whether keeping ``elements`` float32 logits for backward takes under half of the free GPU
    memory."""
    if not hidden.is_cuda:
        # CPU runs are small and their memory is shared with everything else: stay lean
        return False
    free, _ = torch.cuda.mem_get_info(hidden.device)
    return 4 * elements < free // 2


def token_logprobs(model, input_ids, attention_mask, with_entropy: bool = False,
                   chunk_elements: int | None = None, keep_logits: bool | None = None):
    """Per-token log-probs (and entropies) aligned with ``input_ids``: shape [B, T],
    position 0 is 0.

    ``logp[b, t] = log pi(input_ids[b, t] | input_ids[b, :t])``; ``entropy[b, t]`` is the entropy of
    pi(. | input_ids[b, :t]). Padding positions are 0. The vocabulary projection runs in chunks of
    positions. With gradients on, what backward needs of each chunk's logits is either kept
    (``keep_logits=True``) or recomputed in backward by activation checkpointing (``False``: at most
    one chunk of logits is alive at a time, for one more vocabulary matmul per chunk). ``None``
    keeps them on a GPU whose free memory holds them twice over, and recomputes otherwise.
    """
    hidden, head = _hidden_and_head(model, input_ids, attention_mask)
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS_GPU if hidden.is_cuda else CHUNK_ELEMENTS
    hidden, targets = hidden[:, :-1], input_ids[:, 1:]
    B, T1 = targets.shape
    vocab = hidden.shape[-1] if isinstance(head, torch.nn.Identity) else head.out_features
    step = max(1, chunk_elements // max(1, B * vocab))
    recompute = torch.is_grad_enabled() and T1 > step and not (
        keep_logits if keep_logits is not None else _logits_fit(hidden, B * T1 * vocab))
    logps, ents = [], []
    backend = getattr(model, "_minipsft_compile", None)  # set by CausalLM(compile=...)
    chunk_fn = _compiled_chunk_logprobs(backend) if backend else _chunk_logprobs
    for s in range(0, T1, step):
        args = (hidden[:, s:s + step], targets[:, s:s + step], head, with_entropy)
        lp, ent = checkpoint(chunk_fn, *args, use_reentrant=False) if recompute else chunk_fn(*args)
        logps.append(lp)
        ents.append(ent)
    keep = attention_mask[:, 1:].bool()
    zero = hidden.new_zeros(B, 1, dtype=torch.float32)
    logp = torch.cat([zero, torch.cat(logps, 1).masked_fill(~keep, 0.0)], 1)
    if not with_entropy:
        return logp, None
    return logp, torch.cat([zero, torch.cat(ents, 1).masked_fill(~keep, 0.0)], 1)


def _fused_chunk_stats(logits, targets, with_entropy: bool):
    """log Z, log pi(target) and (no grad) the entropy of one chunk's float32 logits."""
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    entropy = None
    if with_entropy:  # H = log Z - sum_v p_v * logit_v
        entropy = logz - (torch.exp(logits - logz.unsqueeze(-1)) * logits).sum(-1)
    return logz, logp, entropy


def _fused_chunk_grad(logits, logz, targets, coef):
    """dL/dlogits of one chunk, given coef = dL/dlogp per token: since d log p_y / d logits =
    onehot(y) - softmax(logits), dL/dlogits = coef * (onehot(y) - p)."""
    grad = -coef.unsqueeze(-1) * torch.exp(logits - logz.unsqueeze(-1))
    return grad.scatter_add(-1, targets.unsqueeze(-1), coef.unsqueeze(-1))


@functools.cache
def _compiled_fused(backend: str):
    return (torch.compile(_fused_chunk_stats, backend=backend, dynamic=True),
            torch.compile(_fused_chunk_grad, backend=backend, dynamic=True))


class _FusedHeadLoss(torch.autograd.Function):
    """The token-mean loss of per-token terms of log pi, through the output head, chunk by chunk.

    Like Liger's fused linear cross-entropy, each chunk's gradient is computed in the forward pass
    while the chunk's logits exist (one vocabulary matmul forward, two for the gradients: no
    recomputation, and never more than one chunk of logits alive). Backward only scales the stored
    gradients. Works for any loss whose terms are per-token functions of log pi (SFT, PSFT, DFT,
    SFT+KL): ``terms(logp_chunk, cols)`` returns the chunk's per-token terms, ``cols`` the slice of
    target positions it covers.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, terms, step, with_entropy, backend):
        stats_fn, grad_fn = _compiled_fused(backend) if backend else (_fused_chunk_stats,
                                                                      _fused_chunk_grad)
        n_tokens = mask.sum()
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = None  # a frozen head (LoRA) needs no weight gradient
        if weight.requires_grad:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = hidden.new_zeros((), dtype=torch.float32)
        logps, ents = [], []
        for s in range(0, targets.shape[1], step):
            cols = slice(s, s + step)
            h, y = hidden[:, cols], targets[:, cols]
            logits = (h @ weight.t()).float()
            logz, logp, entropy = stats_fn(logits, y, with_entropy)
            with torch.enable_grad():  # dL/dlogp of this chunk's tokens: elementwise, cheap
                # positions outside the loss get log-prob 0, as token_logprobs gives them (a
                # padding log-prob far below 0 could overflow exp() in a KL term: 0 * inf = nan)
                lp = logp.detach().masked_fill(mask[:, cols] == 0, 0.0).requires_grad_()
                chunk_loss = (terms(lp, cols) * mask[:, cols]).sum() / n_tokens
                (coef,) = torch.autograd.grad(chunk_loss, lp)
            grad_logits = grad_fn(logits, logz, y, coef).to(hidden.dtype)
            grad_hidden[:, cols] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.flatten(0, 1).t() @ h.flatten(0, 1)).float()
            loss += chunk_loss.detach()
            logps.append(logp)
            ents.append(entropy)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        logp = torch.cat(logps, 1)
        entropy = torch.cat(ents, 1) if with_entropy else torch.zeros_like(logp)
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss
        return grad_hidden * grad_loss, grad_weight, None, None, None, None, None, None


def fused_head_loss(model, input_ids, attention_mask, loss_mask, terms, with_entropy: bool = False,
                    chunk_elements: int | None = None):
    """``(loss, logp, entropy)`` with ``loss = sum_t mask_t * terms(logp)_t / sum_t mask_t`` and its
    gradient computed while each chunk's logits exist (see ``_FusedHeadLoss``).

    ``logp`` and ``entropy`` are what ``token_logprobs`` returns (no gradient); ``terms(logp_chunk,
    cols)`` gives the per-token loss terms of the target positions ``cols`` (position t + 1 of
    ``input_ids``). For models whose output head is not a plain linear map (soft-capped or scaled
    logits) it falls back to ``token_logprobs`` and ordinary autograd.
    """
    mask = loss_mask[:, 1:].to(torch.float32)
    head = fast_head(model)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:  # decided before a forward
        logp, entropy = token_logprobs(model, input_ids, attention_mask, with_entropy,
                                       chunk_elements)
        loss = (terms(logp[:, 1:], slice(None)) * mask).sum() / mask.sum()
        return loss, logp.detach(), entropy
    hidden, head = _hidden_and_head(model, input_ids, attention_mask)
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS_GPU if hidden.is_cuda else CHUNK_ELEMENTS
    hidden, targets = hidden[:, :-1], input_ids[:, 1:]
    step = max(1, chunk_elements // max(1, targets.shape[0] * head.out_features))
    backend = getattr(model, "_minipsft_compile", None)
    loss, logp, entropy = _FusedHeadLoss.apply(hidden, head.weight, targets, mask, terms, step,
                                               with_entropy, backend)
    keep = attention_mask[:, 1:].bool()
    zero = logp.new_zeros(logp.shape[0], 1)
    logp = torch.cat([zero, logp.masked_fill(~keep, 0.0)], 1)
    if not with_entropy:
        return loss, logp, None
    return loss, logp, torch.cat([zero, entropy.masked_fill(~keep, 0.0)], 1)


class CausalLM:
    """A causal LM plus its tokenizer, on one device, with the few operations fine-tuning needs."""

    def __init__(self, model, tokenizer, device=None, dtype=None,
                 gradient_checkpointing: bool = False, compile: bool | str = False,
                 keep_logits: bool | None = None, fused_head: bool | None = None):
        self.device = resolve_device(device)
        self.keep_logits = keep_logits  # see token_logprobs: None = keep when the GPU has room
        # training steps through fused_head_loss (gradients in the forward pass, chunk by chunk):
        # less memory than keeping the logits, but on one H200 slower than that when compiled
        # (results/gpu/README.md), so off unless asked for; None = off.
        self.fused_head = bool(fused_head)
        self.model = model.to(device=self.device, dtype=resolve_dtype(dtype, self.device))
        self.tokenizer = tokenizer
        if gradient_checkpointing:
            # recompute each layer in backward: activation memory ~ one layer
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                self.model.activation_checkpointing_enable()
            else:
                self.model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        if compile:
            # "regional" compilation: torch.compile each decoder layer in place. The layers share
            # one code object, so one graph is compiled and reused by all of them: seconds, where
            # compiling the whole model took minutes. True = inductor; a string picks another
            # backend (e.g. "aot_eager").
            backend = "inductor" if compile is True else compile
            for layer in self.model.get_decoder().layers:
                layer.compile(backend=backend, dynamic=True)
            # token_logprobs then compiles its vocabulary chunks too
            self.model._minipsft_compile = backend
        if tokenizer.pad_token_id is None:
            # many chat models ship without one; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, attn_implementation="sdpa",
                        gradient_checkpointing: bool = False, compile: bool | str = False,
                        keep_logits: bool | None = None, fused_head: bool | None = None, **kwargs):
        """Load from a hub id or a local folder written by ``save_pretrained``; a model that
        cannot be loaded raises ``ModelLoadError`` with a one-line reason."""
        dev = resolve_device(device)
        problem = _local_problem(str(name_or_path))
        if problem:
            raise ModelLoadError(problem)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=resolve_dtype(dtype, dev),
                attn_implementation=attn_implementation, **kwargs)
        except OSError as e:  # transformers' "not found / cannot connect" errors are OSErrors
            raise ModelLoadError(_load_problem(str(name_or_path), e)) from e
        return cls(model, tokenizer, dev, dtype, gradient_checkpointing, compile, keep_logits,
                   fused_head)

    @classmethod
    def from_config(cls, config, tokenizer, seed: int = 0, device=None, dtype=None,
                    compile: bool | str = False, keep_logits: bool | None = None,
                    fused_head: bool | None = None):
        """A freshly initialised model of any transformers architecture (tiny ones for tests and the
        toy world)."""
        torch.manual_seed(seed)
        return cls(AutoModelForCausalLM.from_config(config), tokenizer, device, dtype,
                   compile=compile, keep_logits=keep_logits, fused_head=fused_head)

    def save_pretrained(self, path):
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    # ---------------------------------------------------------------- LoRA
    def add_lora(self, r: int = 16, alpha: float | None = None, dropout: float = 0.0,
                 target_modules="all-linear"):
        """Wrap the model with a fresh LoRA adapter (``peft``): only the adapter trains, pi_old
        stays a set of stored log-probs, and pi_ref (SFT+KL, the anchored ablation) is the model
        with its adapter switched off, not a copy. ``alpha`` defaults to ``2 * r``;
        ``target_modules`` is peft's (``"all-linear"``: every linear layer but the output head)."""
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError("LoRA needs peft: pip install peft (or minipsft[lora])") from None
        config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha or 2 * r,
                            lora_dropout=dropout, target_modules=target_modules)
        self.model = get_peft_model(self.model, config)
        return self

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    def save_merged(self, path):
        """Merge the LoRA adapter into the weights, in place (no second copy of the model in
        memory; the model has no adapter afterwards), and save it (plain transformers loads it)."""
        self.model = self.model.merge_and_unload()
        self.save_pretrained(path)

    def frozen_logprobs(self):
        """``batch -> log pi(target)`` under the weights as they are now, kept for later (pi_ref
        of SFT+KL, or an anchored pi_old): the model with its LoRA adapter switched off when the
        adapter is still at its zero start (no copy), else a frozen copy of the model."""
        fresh_adapter = self.is_lora and all(
            not p.any() for n, p in self.model.named_parameters() if "lora_B" in n)
        frozen = None if fresh_adapter else self.frozen_copy()

        @torch.no_grad()
        def logprobs(batch):
            if frozen is not None:
                return self.token_logprobs(batch, model=frozen)[0]
            with self.model.disable_adapter():
                return self.token_logprobs(batch)[0]
        return logprobs

    def frozen_copy(self):
        """A gradient-free copy of the current weights (pi_ref for SFT+KL, or an anchored
        pi_old)."""
        model = copy.deepcopy(self.model).eval()
        model.requires_grad_(False)
        return model

    @property
    def max_length(self) -> int:
        return getattr(self.model.config, "max_position_embeddings", None) or 2048

    # ---------------------------------------------------------------- encoding
    def _render(self, messages, add_generation_prompt: bool) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
        # plain fallback, no template
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    def prompt_ids(self, prompt) -> list:
        """Token ids of a prompt: a string (tokenised with the tokenizer's special tokens, e.g. BOS)
        or a list of chat messages (rendered with the chat template, generation prompt appended)."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return self.tokenizer(self._render(prompt, True), add_special_tokens=False)["input_ids"]

    def _split(self, row, all_turns: bool = False):
        """(prompt ids, completion ids, completion mask) of one row in TRL's formats. The mask is 1
        on the tokens trained on: the completion, or with ``all_turns`` every assistant turn of a
        conversation (TRL's ``assistant_only_loss``)."""
        tok = self.tokenizer
        if row.get("messages") is not None and all_turns:
            return self._split_turns(row["messages"])
        if row.get("messages") is not None:
            prompt, completion = row["messages"][:-1], row["messages"][-1:]
        else:
            prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            ids = tok(completion, add_special_tokens=False)["input_ids"]
            ids = ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
            return self.prompt_ids(prompt), ids, [1] * len(ids)
        head = self._render(prompt, add_generation_prompt=True)
        full = self._render(list(prompt) + list(completion), add_generation_prompt=False)
        if not full.startswith(head):
            raise DataError("the chat template renders the conversation so that the prompt is not "
                            "a prefix of it")
        ids = tok(full[len(head):], add_special_tokens=False)["input_ids"]
        return tok(head, add_special_tokens=False)["input_ids"], ids, [1] * len(ids)

    def _split_turns(self, messages):
        """Every assistant turn trained on: the conversation rendered turn by turn, each piece
        tokenised on its own (as the last-turn case), assistant pieces masked 1."""
        tok = self.tokenizer
        pieces, done = [], ""  # (text, is_assistant) in order; `done` = text rendered so far
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self._render(messages[:i], add_generation_prompt=True)
            upto = self._render(messages[:i + 1], add_generation_prompt=False)
            if not (head.startswith(done) and upto.startswith(head)):
                raise DataError(f"the chat template renders the conversation so that the text "
                                f"before assistant turn {i} is not a prefix of it")
            pieces += [(head[len(done):], False), (upto[len(head):], True)]
            done = upto
        ids, mask = [], []
        for text, trained in pieces:
            piece = tok(text, add_special_tokens=False)["input_ids"] if text else []
            ids += piece
            mask += [int(trained)] * len(piece)
        first = mask.index(1) if 1 in mask else len(ids)
        return ids[:first], ids[first:], mask[first:]

    def encode(self, rows, max_length=None, all_assistant_turns: bool = False) -> list:
        """Rows -> examples ``{"input_ids": [...], "completion_mask": [...]}`` (1 on trained
        tokens).

        Formats (TRL's): ``{"prompt": str, "completion": str}`` (EOS appended to the completion),
        ``{"messages": [...]}`` (the final assistant message is the completion, the rest the prompt,
        via the chat template; with ``all_assistant_turns`` every assistant message is trained on,
        as TRL's ``assistant_only_loss``), or ``{"prompt": [msgs], "completion": [msgs]}``.
        Sequences longer than ``max_length`` (default: the model's context) lose their end; a row
        left with no trained token is never trained on: all such rows are reported in one
        ``DataError``.
        """
        max_length = max_length or self.max_length
        examples, problems, cut = [], [], 0
        for i, row in enumerate(rows, start=1):
            try:
                prompt, completion, trained = self._split(row, all_assistant_turns)
            except DataError as e:
                problems.append(f"row {i}: {e}")
                continue
            if not prompt:
                problems.append(f"row {i}: the prompt encodes to no token")
            elif not completion:
                problems.append(f"row {i}: the completion encodes to no token")
            elif len(prompt) >= max_length:
                problems.append(f"row {i}: completion truncated away (prompt has {len(prompt)} "
                                f"tokens, max_length is {max_length})")
            else:
                keep = min(len(completion), max_length - len(prompt))
                cut += keep < len(completion)
                examples.append({"input_ids": prompt + completion[:keep],
                                 "completion_mask": [0] * len(prompt) + trained[:keep]})
        if problems:
            raise DataError.listing(f"{len(problems)} row(s) cannot be trained on", problems)
        if cut:
            warnings.warn(f"{cut} of {len(examples)} completions were shortened to "
                          f"max_length={max_length}")
        return examples

    def collate(self, examples) -> dict:
        """Right-pad a list of examples into tensors on the model's device."""
        T = max(len(e["input_ids"]) for e in examples)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(examples), T), pad, dtype=torch.long)
        attn = torch.zeros((len(examples), T), dtype=torch.long)
        comp = torch.zeros((len(examples), T), dtype=torch.long)
        for b, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[b, :n] = torch.tensor(e["input_ids"])
            attn[b, :n] = 1
            comp[b, :n] = torch.tensor(e["completion_mask"])
        return {k: v.to(self.device) for k, v in
                {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}.items()}

    # ---------------------------------------------------------------- scoring and sampling
    def token_logprobs(self, batch, with_entropy: bool = False, model=None):
        """``token_logprobs`` of a collated batch under this model (or another one, e.g. a frozen
        copy)."""
        return token_logprobs(model if model is not None else self.model,
                              batch["input_ids"], batch["attention_mask"], with_entropy,
                              keep_logits=self.keep_logits)

    def fused_loss(self, batch, terms, with_entropy: bool = False, loss_mask=None):
        """``fused_head_loss`` of a collated batch: ``(loss, logp, entropy)``, the loss the
        token-mean of ``terms`` over the completion tokens."""
        loss_mask = batch["completion_mask"] if loss_mask is None else loss_mask
        return fused_head_loss(self.model, batch["input_ids"], batch["attention_mask"],
                               loss_mask, terms, with_entropy)

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
        if not do_sample:
            return GenerationConfig(do_sample=False, **special)
        return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                                **special)

    @property
    def hf_model(self):
        """The transformers model itself (under a PEFT wrapper, its base model)."""
        if hasattr(self.model, "get_base_model"):
            return self.model.get_base_model()
        return self.model

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
                enc = [self.prompt_ids(p) for p in prompts[s:s + batch_size]]
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
