"""A speed path, ``CausalLM(fused_head=True)``: the loss's gradient computed in the forward pass
while each chunk's logits exist (Liger's fused linear cross-entropy, for any loss whose terms are
per-token functions of log pi); no logits are kept or recomputed for backward."""
import functools

import torch

from .logprobs import at_positions
from .speed import (CHUNK_ELEMENTS, CHUNK_ELEMENTS_GPU, decoder_hidden, fast_head, logit_stats,
                    token_logprobs)

__all__ = ["fused_head_loss", "objective_terms", "objective_loss"]


def _fused_chunk_grad(logits, logz, targets, coef):
    """dL/dlogits of one chunk, given coef = dL/dlogp per token: since d log p_y / d logits =
    onehot(y) - softmax(logits), dL/dlogits = coef * (onehot(y) - p)."""
    grad = -coef.unsqueeze(-1) * torch.exp(logits - logz.unsqueeze(-1))
    return grad.scatter_add(-1, targets.unsqueeze(-1), coef.unsqueeze(-1))


@functools.cache
def _compiled_fused(backend: str):
    return (torch.compile(logit_stats, backend=backend, dynamic=True),
            torch.compile(_fused_chunk_grad, backend=backend, dynamic=True))


class _FusedHeadLoss(torch.autograd.Function):
    """Per chunk: one vocabulary matmul forward and two for the gradients, one chunk of logits alive
    at a time; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, terms, step, with_entropy, backend):
        stats_fn, grad_fn = (_compiled_fused(backend) if backend
                             else (logit_stats, _fused_chunk_grad))
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
                    chunk_elements: int | None = None, compile: str | None = None):
    """``(loss, logp, entropy)``: ``loss = sum_t mask_t * terms(logp)_t / sum_t mask_t``, its
    gradient computed while each chunk's logits exist; ``logp`` and ``entropy`` as
    ``token_logprobs`` gives them (no gradient). A head that is not a plain linear map (scaled or
    capped logits) falls back to ``token_logprobs`` and ordinary autograd."""
    mask = loss_mask[:, 1:].to(torch.float32)
    head = fast_head(model)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:  # decided before a forward
        logp, entropy = token_logprobs(model, input_ids, attention_mask, with_entropy,
                                       chunk_elements)
        loss = (terms(logp[:, 1:], slice(None)) * mask).sum() / mask.sum()
        return loss, logp.detach(), entropy
    hidden = decoder_hidden(model, input_ids, attention_mask)
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS_GPU if hidden.is_cuda else CHUNK_ELEMENTS
    hidden, targets = hidden[:, :-1], input_ids[:, 1:]
    step = max(1, chunk_elements // max(1, targets.shape[0] * head.out_features))
    loss, logp, entropy = _FusedHeadLoss.apply(hidden, head.weight, targets, mask, terms, step,
                                               with_entropy, compile)
    return loss, *at_positions(attention_mask, logp, entropy if with_entropy else None)


def objective_terms(objective):
    """``terms(logp, cols)``: a ``train.Objective``'s per-token loss terms at the target positions
    ``cols`` (position t + 1 of the input), what ``fused_head_loss`` differentiates."""
    if objective.loss.vocab_kl:  # its KL's gradient reaches every logit, not only log p_t's
        raise ValueError(f"method={objective.cfg.method!r}: the fused head takes losses of log "
                         "p_t alone, not a whole-vocabulary KL")

    def terms(logp, cols):
        old = objective.logp_old
        old = logp.detach() if old is None else old[:, 1:][:, cols]  # None: ratio 1
        ref = None if objective.logp_ref is None else objective.logp_ref[:, 1:][:, cols]
        return objective.loss.terms(logp, old, ref, objective.cfg)
    return terms


def objective_loss(lm, micro, objective):
    """``(loss, logp, entropy, metrics)`` of a micro-batch's ``train.Objective`` through the fused
    head; the metrics computed from the log-probs as the reference path computes them."""
    loss, logp, entropy = fused_head_loss(lm.model, micro["input_ids"], micro["attention_mask"],
                                          objective.weights, objective_terms(objective), True,
                                          compile=lm.compile)
    with torch.no_grad():  # the same loss on the same log-probs, for its diagnostics
        metrics = objective(logp)[1]
    return loss, logp, entropy, metrics
