"""The speed paths: ``logprobs.token_logprobs``'s log-probs from the decoder's hidden states, chunk
by chunk through the output head, so that no full [B, T, V] logits tensor is ever built (real
vocabularies are 150k wide). ``CausalLM(speed=True)``; tests/test_speed.py proves them equal."""
import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from . import logprobs

__all__ = ["token_logprobs", "token_logprobs_kl", "compile_layers", "fast_head", "logit_scale",
           "ScaledHead", "decoder_hidden", "logit_stats", "CHUNK_ELEMENTS", "CHUNK_ELEMENTS_GPU"]

# Elements of one [rows, positions, vocab] float32 logits chunk: 2**25 (128 MiB) on CPU; 2**28
# (1 GiB) on GPU, where small chunks leave the vocabulary projection's matmuls too thin to be fast.
CHUNK_ELEMENTS = 2**25
CHUNK_ELEMENTS_GPU = 2**28


def logit_stats(logits, targets, with_entropy: bool) -> tuple:
    """log Z, log pi(target) and (no grad) the entropy of one chunk's float32 logits [B, c, V]."""
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    entropy = None
    if with_entropy:
        with torch.no_grad():  # a diagnostic: H = -sum_v p_v log p_v (log Z - E[logit] would lose
            log_p = logits - logz.unsqueeze(-1)  # ~1e-3 nats to float32 when logits reach ~40)
            entropy = -(log_p.exp() * log_p).sum(-1)
    return logz, logp, entropy


def chunk_logprobs(hidden, targets, head, with_entropy: bool, ref_hidden=None, ref_head=None):
    # [B, c, V], float32 so that exp(logp - logp_old) is exact enough to clip
    logits = head(hidden).float()
    logz, logp, entropy = logit_stats(logits, targets, with_entropy)
    kl = None
    if ref_hidden is not None:  # KL(pi_ref || pi) over the vocabulary: this chunk's logits only
        with torch.no_grad():
            ref_logp_all = torch.log_softmax(ref_head(ref_hidden).float(), dim=-1)
        kl = logprobs.vocab_kl(logits - logz.unsqueeze(-1), ref_logp_all)
    return logp, entropy, kl


@functools.cache
def compiled_chunk_logprobs(backend: str):
    """``chunk_logprobs`` compiled once per backend: the log-softmax, the gather and the entropy
    fuse into one pass over the chunk's logits instead of several."""
    return torch.compile(chunk_logprobs, backend=backend, dynamic=True)


def logit_scale(config) -> float:
    """The factor a model multiplies its head's logits by, read from its config as TRL reads it
    (Granite and MiniCPM3 divide by ``logits_scaling``; HyperCLOVA X multiplies); 1.0 if none."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is None:
        return 1.0
    return float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)


class ScaledHead(torch.nn.Module):
    """A head as such models apply it: the linear map, times a scale (divided by ``1 / scale``
    where the model divides: the same bf16 rounding), then Gemma-2's soft cap."""

    def __init__(self, linear: torch.nn.Linear, scale: float = 1.0, softcap: float | None = None,
                 divide: bool = False):
        super().__init__()
        self.linear, self.scale, self.softcap, self.divide = linear, scale, softcap, divide
        self.out_features = linear.out_features

    def forward(self, hidden):
        logits = self.linear(hidden)
        if self.scale != 1.0:  # as the architecture writes it: x / (1 / scale) or x * scale
            logits = logits / (1.0 / self.scale) if self.divide else logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# model -> its head as a function of the decoder's hidden states, or None: checked once per model
_FAST_HEADS = weakref.WeakKeyDictionary()


def fast_head(model):
    """The head (``nn.Linear`` or ``ScaledHead``) that turns the decoder's last hidden states into
    exactly the model's own logits, or None: checked once per model against ``model(...).logits``,
    so an architecture that does something else (a hidden-state scale, say) is caught."""
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


def decoder_hidden(model, input_ids, attention_mask):
    """The decoder's final hidden states (what ``fast_head`` turns into logits)."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False).last_hidden_state


def token_logprobs(model, input_ids, attention_mask, with_entropy: bool = False,
                   chunk_elements: int | None = None, keep_logits: bool | None = None,
                   compile: str | None = None):
    """``logprobs.token_logprobs``'s result, the head run on the hidden states in chunks of
    positions (the reference path for a model with no ``fast_head``). With gradients on, each
    chunk's logits are kept for backward (``keep_logits=True``) or recomputed there (``False``: one
    chunk alive at a time, for one more vocabulary matmul); ``None`` keeps them on a GPU whose free
    memory holds them twice over. ``compile``: a torch.compile backend for the chunks."""
    if fast_head(model) is None:
        return logprobs.token_logprobs(model, input_ids, attention_mask, with_entropy)
    return chunked_logprobs(model, input_ids, attention_mask, with_entropy, chunk_elements,
                            keep_logits, compile)[:2]


def token_logprobs_kl(model, input_ids, attention_mask, ref_hidden, ref_head,
                      chunk_elements: int | None = None, keep_logits: bool | None = None,
                      compile: str | None = None):
    """``logprobs.token_logprobs_kl``'s ``(logp, entropy, kl)`` for a model with a ``fast_head``,
    chunk by chunk: the reference's logits come from its final hidden states ``ref_hidden`` and
    ``ref_head`` one chunk at a time, beside the model's, so no [B, T, V] tensor is ever built."""
    return chunked_logprobs(model, input_ids, attention_mask, True, chunk_elements, keep_logits,
                            compile, (ref_hidden[:, :-1], ref_head))


def chunked_logprobs(model, input_ids, attention_mask, with_entropy, chunk_elements, keep_logits,
                     compile, ref=None) -> tuple:
    """``(logp, entropy, kl)`` chunk by chunk through ``fast_head(model)`` (``kl``: None unless
    ``ref``, the reference's hidden states and head, is given)."""
    head = fast_head(model)
    hidden = decoder_hidden(model, input_ids, attention_mask)
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS_GPU if hidden.is_cuda else CHUNK_ELEMENTS
    hidden, targets = hidden[:, :-1], input_ids[:, 1:]
    B, T1 = targets.shape
    vocab = head.out_features
    step = max(1, chunk_elements // max(1, B * vocab))
    if keep_logits is None and torch.is_grad_enabled():  # under half the free GPU memory; CPU: lean
        kept = 4 * B * T1 * vocab * (1 if ref is None else 2)  # a KL keeps pi_ref's probabilities
        keep_logits = hidden.is_cuda and kept < torch.cuda.mem_get_info(hidden.device)[0] // 2
    recompute = torch.is_grad_enabled() and T1 > step and not keep_logits
    chunk_fn = compiled_chunk_logprobs(compile) if compile else chunk_logprobs
    if recompute:  # backward recomputes each chunk's logits (activation checkpointing)
        chunk_fn = functools.partial(checkpoint, chunk_fn, use_reentrant=False)
    ref_hidden, ref_head = ref or (None, None)
    outs = [chunk_fn(hidden[:, s:s + step], targets[:, s:s + step], head, with_entropy,
                     None if ref is None else ref_hidden[:, s:s + step], ref_head)
            for s in range(0, T1, step)]
    return logprobs.at_positions(attention_mask, *(None if parts[0] is None else torch.cat(parts, 1)
                                                   for parts in zip(*outs)))


def compile_layers(model, backend: str) -> None:
    """torch.compile each decoder layer in place: the layers share one code object, so one graph
    serves them all (seconds, where compiling the whole model took minutes)."""
    for layer in model.get_decoder().layers:
        layer.compile(backend=backend, dynamic=True)
