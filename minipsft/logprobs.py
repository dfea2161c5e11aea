"""Per-token log-probs and entropies from any causal LM, written the plain way (the reference path)."""
import torch

__all__ = ["heldout_eval"]


def chunks(seq, size) -> list:
    """``seq`` cut into consecutive pieces of ``size`` (the last may be shorter)."""
    return [seq[i:i + size] for i in range(0, len(seq), size)]


@torch.no_grad()
def heldout_eval(lm, examples, batch_size: int = 32) -> dict:
    """Mean NLL and mean token entropy over the completion tokens of held-out examples."""
    was_training = lm.model.training
    lm.model.eval()
    nll = ent = n = 0.0
    for chunk in chunks(examples, batch_size):
        batch = lm.collate(chunk)
        logp, entropy = lm.token_logprobs(batch, with_entropy=True)
        m = batch["completion_mask"].float()
        nll, ent, n = (nll - (logp * m).sum().item(), ent + (entropy * m).sum().item(),
                       n + m.sum().item())
    lm.model.train(was_training)
    return {"heldout_nll": nll / n, "heldout_entropy": ent / n}
