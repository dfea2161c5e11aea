"""Fine-tuning losses on per-token log-probs: SFT, PSFT and the baselines.

Every loss takes the log-probabilities of the *target* tokens (the demonstration, or a sampled
completion), so it drops into any framework that can produce them:

    logp, logp_old, logp_ref : float [B, T]   log pi(a_t | s_t) under the current / snapshot /
                                              base model
    mask                     : [B, T]         1 on completion tokens, 0 on prompt and padding

and returns ``(loss, metrics)``: a scalar tensor (the token-mean over ``mask``, as in the official
PSFT code) and a dict of plain Python floats computed without gradient.

Why PSFT is a policy gradient (PAPER.md): SFT's gradient ``-mean_t grad log pi(a_t|s_t)`` is the
policy gradient with advantage ``A = 1`` on samples from the data set. PSFT keeps ``A = 1`` and
swaps ``log pi`` for PPO's clipped importance ratio against a frozen snapshot ``pi_old``::

    L = -mean_t min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t),
    r_t = pi(a_t|s_t) / pi_old(a_t|s_t)

``clipped_surrogate`` is that one formula; ``psft_loss`` calls it with ``A = 1`` and an RL stage
calls it with group-normalised advantages.
"""
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Loss", "LOSSES", "clipped_surrogate", "psft_loss", "sft_loss", "dft_loss",
           "sft_kl_loss", "anchored_loss", "masked_mean",
           "surrogate_terms", "nll_terms", "dft_terms", "kl_terms"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean of ``x`` over the positions where ``mask`` is 1 (all tokens of the batch pooled);
    a float ``mask`` weighs each position (``train.token_weights``: e.g. a mean over sequences)."""
    return (x * mask).sum() / mask.sum()


def _check(logp: torch.Tensor, mask: torch.Tensor, **others: torch.Tensor) -> torch.Tensor:
    """Validate shapes and the mask; return the mask in ``logp``'s dtype."""
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, t in {"mask": mask, **others}.items():
        if t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, "
                             f"expected {tuple(logp.shape)} like logp")
    if not (mask != 0).any():
        # a silent zero loss would "train" on nothing and report success: refuse instead
        raise ValueError("mask has no completion token: nothing to train on "
                         "(check prompt/completion lengths and truncation)")
    return mask.to(logp.dtype)


def _floats(metrics: dict) -> dict:
    """Tensor metrics -> Python numbers in one device-to-host copy (one sync, not one each)."""
    values = torch.stack([v.detach().float() for v in metrics.values()]).tolist()
    out = dict(zip(metrics, values))
    if "num_tokens" in out:
        out["num_tokens"] = int(out["num_tokens"])
    return out


def _per_token(advantages, logp: torch.Tensor) -> torch.Tensor:
    """A float, a [B] tensor (one per sequence) or [B, T] -> [B, T] like ``logp``."""
    advantages = torch.as_tensor(advantages, dtype=logp.dtype, device=logp.device)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages.expand_as(logp)


# Per-token loss terms: each loss below is the token-mean of its terms over the mask. The fused
# output-head path (fused.fused_head_loss) takes these terms and differentiates them chunk by chunk.

def surrogate_terms(logp, logp_old, advantages, eps_low: float = 0.2, eps_high: float = 0.28):
    """``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` per token, r = exp(logp - logp_old)."""
    ratio = torch.exp(logp - logp_old.detach())
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def nll_terms(logp):
    """SFT: ``-log pi(a_t|s_t)``."""
    return -logp


def dft_terms(logp):
    """DFT: ``-stopgrad(p_t) log p_t``."""
    return -torch.exp(logp.detach()) * logp


def kl_terms(logp, logp_ref):
    """The k3 penalty ``exp(logp_ref - logp) - (logp_ref - logp) - 1`` (>= 0) per token."""
    delta = logp_ref.detach() - logp
    return torch.exp(delta) - delta - 1.0


def clipped_surrogate(logp, logp_old, advantages, mask, eps_low: float = 0.2,
                      eps_high: float = 0.28):
    """PPO's pessimistic clipped objective, ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``,
    token-mean.

    ``advantages`` is a float, a ``[B]`` tensor (one per sequence, as in GRPO) or ``[B, T]``.
    Metrics: ``clipfrac`` (fraction of tokens whose gradient the clip removed), split into
    ``clipfrac_high`` (A > 0 and r > 1+eps_high) and ``clipfrac_low`` (A < 0 and r < 1-eps_low),
    ``ratio_mean``, ``ratio_max``, ``approx_kl`` (the "k3" term ``(r-1) - log r``: on tokens
    sampled from pi_old, as in GRPO, it estimates KL(pi_old || pi); on PSFT's demonstration tokens
    it is a drift measure, not that estimate), ``num_tokens``.
    """
    advantages = _per_token(advantages, logp)
    m = _check(logp, mask, logp_old=logp_old)
    loss = masked_mean(surrogate_terms(logp, logp_old, advantages, eps_low, eps_high), m)
    log_ratio = logp.detach() - logp_old.detach()
    ratio = torch.exp(log_ratio)

    with torch.no_grad():
        on = m.bool()
        # The min picks the clipped (constant, zero-gradient) branch only when the ratio has already
        # moved in the direction the advantage pushes it: up past 1+eps_high for A > 0, down past
        # 1-eps_low for A < 0. For A > 0 and r < 1-eps_low the min keeps r*A, so the gradient still
        # flows: with PSFT's A = 1 only the upper bound can ever stop a gradient.
        high = (advantages > 0) & (ratio > 1.0 + eps_high) & on
        low = (advantages < 0) & (ratio < 1.0 - eps_low) & on
        n = on.sum()
        metrics = {
            "clipfrac": (high | low).sum() / n,
            "clipfrac_high": high.sum() / n,
            "clipfrac_low": low.sum() / n,
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": ratio.masked_fill(~on, 0.0).max(),
            # k3, >= 0 (Schulman's note; TRL, verl): KL(pi_old || pi) when tokens ~ pi_old
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, m),
            "num_tokens": n,
        }
    return loss, _floats(metrics)


def psft_loss(logp, logp_old, mask, eps_low: float = 0.2, eps_high: float = 0.28):
    """PSFT: the clipped surrogate with advantage 1 on every demonstration token.

    A token whose probability already rose past ``(1 + eps_high)`` times its ``pi_old`` value gets
    zero gradient; every other token gets ``r_t * grad log pi``. At ``r = 1`` this is SFT's
    gradient.
    """
    return clipped_surrogate(logp, logp_old, 1.0, mask, eps_low, eps_high)


def sft_loss(logp, mask):
    """SFT: token-mean negative log-likelihood of the demonstration."""
    m = _check(logp, mask)
    return masked_mean(nll_terms(logp), m), {"num_tokens": int((m != 0).sum().item())}


def dft_loss(logp, mask):
    """DFT ("dynamic fine-tuning", TRL's ``loss_type="dft"``): ``-stopgrad(p_t) * log p_t``.

    Each token's NLL gradient is scaled by its own probability, so tokens the model finds unlikely
    are pushed less (the opposite of SFT's ``1/p`` weighting of ``grad p``).
    """
    m = _check(logp, mask)
    return masked_mean(dft_terms(logp), m), {"num_tokens": int((m != 0).sum().item())}


def sft_kl_loss(logp, logp_ref, mask, kl_coef: float = 0.5):
    """SFT plus ``kl_coef`` times the per-token k3 penalty on the demonstration tokens.

    ``exp(logp_ref - logp) - (logp_ref - logp) - 1`` (>= 0) is GRPO/TRL's "k3" term. On tokens
    sampled from pi it estimates KL(pi || pi_ref); here the tokens come from the data set D, not
    from pi, so it is a penalty on the demonstrations, not an estimate of that KL.
    Its gradient per token is ``(1 - pi_ref/pi) grad log pi``: it pulls a token back only once the
    model puts more mass on it than the reference does. Metrics: ``nll``, ``kl``.
    """
    m = _check(logp, mask, logp_ref=logp_ref)
    nll = masked_mean(nll_terms(logp), m)
    kl_mean = masked_mean(kl_terms(logp, logp_ref), m)
    metrics = _floats({"nll": nll.detach(), "kl": kl_mean.detach(), "num_tokens": (m != 0).sum()})
    return nll + kl_coef * kl_mean, metrics


def anchored_loss(terms, kl, mask, kl_coef: float = 0.1):
    """``terms + kl_coef * KL(pi_ref(.|s_t) || pi(.|s_t))``, token-mean: a per-token loss anchored
    to the starting model by the KL over the *whole vocabulary* at each completion position (``kl``,
    ``logprobs.token_logprobs_kl``), not only the demonstration's token as ``sft_kl``'s k3.

    With ``dft_terms`` it is ASFT (Anchored SFT, arXiv 2509.23753), as its authors' code computes
    it (zhuchichi56/ASFT ``train_v2.py``, mode ``asft``): ``CE_t * stopgrad(p_t) + 0.1 *
    sum_v pi_ref(v) (log pi_ref(v) - log pi(v))``, the KL forward (``F.kl_div(log_softmax(logits),
    softmax(ref_logits))``), exact (no sampled estimator), averaged over completion tokens. With
    ``nll_terms`` it is their ``sft+kl`` (LLaMA-Factory's and unsloth's default KL too). The KL's
    gradient per position is ``pi - pi_ref`` on the logits: it pulls the whole distribution back.
    Metrics: ``kl`` (the mean KL, nats), ``num_tokens``."""
    m = _check(kl, mask)
    kl_mean = masked_mean(kl, m)
    metrics = _floats({"kl": kl_mean.detach(), "num_tokens": (m != 0).sum()})
    return masked_mean(terms, m) + kl_coef * kl_mean, metrics


# ---------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Loss:
    """A fine-tuning loss. Adding one is a function above plus an entry in ``LOSSES``: the training
    loop, the CLI's ``--method`` choices, the experiment runner's arms and the figures follow.

    ``loss(logp, mask, logp_old, logp_ref, settings)`` returns ``(loss, metrics)``;
    ``terms(logp, logp_old, logp_ref, settings)`` the per-token terms whose token-mean it is (the
    fused output head differentiates those). ``settings`` carries ``eps_low``, ``eps_high`` and
    ``kl_coef`` (a ``TrainConfig``). A ``vocab_kl`` loss gets, in ``logp_ref``'s place, each
    position's whole-vocabulary ``KL(pi_ref || pi)`` (with its gradient), and ``vocab_kl_coef``."""
    loss: Callable
    terms: Callable
    label: str  # its name in reports and figures
    colour: str  # its colour in figures
    snapshot: bool = False  # compares with pi_old, a snapshot of the weights refreshed per batch
    reference: bool = False  # compares with pi_ref, the frozen starting weights
    vocab_kl: bool = False  # ... through KL(pi_ref || pi) over the whole vocabulary (reference too)


LOSSES = {
    "psft": Loss(lambda logp, mask, old, ref, s: psft_loss(logp, old, mask, s.eps_low, s.eps_high),
                 lambda logp, old, ref, s: surrogate_terms(logp, old, 1.0, s.eps_low, s.eps_high),
                 "PSFT", "tab:blue", snapshot=True),
    "sft": Loss(lambda logp, mask, old, ref, s: sft_loss(logp, mask),
                lambda logp, old, ref, s: nll_terms(logp),
                "SFT (PSFT's schedule and lr)", "tab:red"),
    "sft_kl": Loss(lambda logp, mask, old, ref, s: sft_kl_loss(logp, ref, mask, s.kl_coef),
                   lambda logp, old, ref, s: nll_terms(logp) + s.kl_coef * kl_terms(logp, ref),
                   "SFT+KL", "tab:green", reference=True),
    "dft": Loss(lambda logp, mask, old, ref, s: dft_loss(logp, mask),
                lambda logp, old, ref, s: dft_terms(logp),
                "DFT", "tab:purple"),
    # anchored by the whole-vocabulary KL (ref: KL(pi_ref || pi) per position): ASFT, and SFT+KL
    # as the ASFT code, LLaMA-Factory and unsloth compute it
    "asft": Loss(lambda logp, mask, old, kl, s: anchored_loss(dft_terms(logp), kl, mask,
                                                              s.vocab_kl_coef),
                 lambda logp, old, kl, s: dft_terms(logp) + s.vocab_kl_coef * kl,
                 "ASFT", "tab:olive", reference=True, vocab_kl=True),
    "sft_kl_vocab": Loss(lambda logp, mask, old, kl, s: anchored_loss(nll_terms(logp), kl, mask,
                                                                      s.vocab_kl_coef),
                         lambda logp, old, kl, s: nll_terms(logp) + s.vocab_kl_coef * kl,
                         "SFT+KL (whole vocabulary)", "tab:cyan", reference=True, vocab_kl=True),
}
