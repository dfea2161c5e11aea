"""Per-token log-probs and entropies from any causal LM, the plain way: the reference every speed
path (speed.py, fused.py) is tested against."""
import torch

__all__ = ["token_logprobs", "token_logprobs_kl", "vocab_kl", "heldout_eval", "at_positions"]


def at_positions(attention_mask, *values) -> tuple:
    """Values at the predicted positions 1..T-1 [B, T-1] -> [B, T]: 0 at position 0 (no context)
    and on padding; None stays None."""
    keep = attention_mask[:, 1:].bool()
    return tuple(x if x is None else torch.cat([x.new_zeros(len(x), 1), x.masked_fill(~keep, 0)], 1)
                 for x in values)


def token_logprobs(model, input_ids, attention_mask, with_entropy: bool = False):
    """``logp[b, t] = log pi(input_ids[b, t] | input_ids[b, :t])`` and (optionally)
    ``entropy[b, t]``, the entropy of pi(. | input_ids[b, :t]); shape [B, T]. Position 0 (no
    context) and padding are 0."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    # float32, so that exp(logp - logp_old) is exact enough to clip; logits at t predict t + 1
    logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():  # a diagnostic: H = -sum_v p_v log p_v
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return at_positions(attention_mask, logp, entropy)


def vocab_kl(logp_all, ref_logp_all):
    """``KL(pi_ref || pi) = sum_v pi_ref(v) (log pi_ref(v) - log pi(v))`` at each position, from
    log-softmaxed logits [..., V]; the gradient flows to ``logp_all`` only."""
    ref_logp_all = ref_logp_all.detach()
    return (ref_logp_all.exp() * (ref_logp_all - logp_all)).sum(-1)


def token_logprobs_kl(model, input_ids, attention_mask, ref_logits):
    """``token_logprobs``'s log-probs and entropies, and ``kl[b, t]``: the whole-vocabulary
    ``KL(pi_ref || pi)`` of the next-token distributions at position t (ASFT's anchor), where
    ``ref_logits`` are the reference model's logits on the same batch. Shapes [B, T]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    kl = vocab_kl(logp_all, torch.log_softmax(ref_logits[:, :-1].float(), dim=-1))
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return at_positions(attention_mask, logp, entropy, kl)


@torch.no_grad()
def heldout_eval(lm, examples, batch_size: int = 32) -> dict:
    """Mean NLL and mean token entropy over the completion tokens of held-out examples."""
    was_training = lm.model.training
    lm.model.eval()
    nll = ent = n = 0.0
    for start in range(0, len(examples), batch_size):
        batch = lm.collate(examples[start:start + batch_size])
        logp, entropy = lm.token_logprobs(batch, with_entropy=True)
        m = batch["completion_mask"].float()
        nll, ent, n = (nll - (logp * m).sum().item(), ent + (entropy * m).sum().item(),
                       n + m.sum().item())
    lm.model.train(was_training)
    return {"heldout_nll": nll / n, "heldout_entropy": ent / n}
