"""GRPO: the RL stage after fine-tuning, with the same clipped surrogate as PSFT.

SFT is the policy gradient on demonstrations with advantage ``A = 1``; PSFT clips its ratio against
a snapshot ``pi_old``. GRPO keeps that very loss (``losses.clipped_surrogate``) and changes two
things: the tokens come from the policy's *own samples*, and the advantage is a *signed* score
of each sample against the other samples of its prompt ("group")::

    A_i = (R_i - mean(R_group)) / (std(R_group) + 1e-4)          (Shao et al., 2024)

One rollout step: draw ``prompts_per_step`` prompts, sample ``group_size`` completions each from the
current policy, score them with a verifiable reward, freeze the sampler as ``pi_old`` (its log-probs
under no grad), then take one optimizer step per minibatch of ``minibatch_size`` sequences. With
signed advantages both clip bounds act now: ``clipfrac_high`` (A > 0, ratio > 1 + eps_high) and
``clipfrac_low`` (A < 0, ratio < 1 - eps_low). Defaults follow DAPO: eps 0.2/0.28 (clip-higher),
token-mean loss, no KL term (``kl_coef`` adds the k3 estimate of KL(pi || pi_start)). A group whose
rewards are all equal has ``A = 0`` on every token: no gradient.
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..losses import clipped_surrogate, kl_terms, masked_mean
from ..train import adamw, chunks, merge_metrics, setting

__all__ = ["GRPOConfig", "grpo", "group_advantages"]


@dataclass
class GRPOConfig:
    """Every setting of a GRPO run. The help text of each field is its documentation."""
    steps: int = setting(50, "rollout steps (sample, score, update)")
    prompts_per_step: int = setting(16, "prompts drawn per rollout step (cycling through a "
                                        "per-seed shuffle of the pool)")
    group_size: int = setting(8, "completions sampled per prompt; advantages are normalised within "
                                 "each group")
    minibatch_size: int = setting(32, "sequences per optimizer step: prompts_per_step * group_size "
                                      "/ minibatch_size steps per rollout, all against the same "
                                      "pi_old (the sampler)")
    ppo_epochs: int = setting(1, "passes over each rollout batch")
    lr: float = setting(1e-5, "AdamW learning rate (constant)")
    eps_low: float = setting(0.2, "lower clip: acts on negative-advantage tokens whose ratio fell "
                                  "below 1-eps_low")
    eps_high: float = setting(0.28, "upper clip (DAPO's clip-higher): acts on positive-advantage "
                                    "tokens above 1+eps_high")
    kl_coef: float = setting(0.0, "weight of a k3 KL(pi || pi_start) penalty on the sampled tokens "
                                  "(0 = none, as DAPO)")
    scale_rewards: bool = setting(True, "divide by the group's reward std (GRPO); off = "
                                        "mean-centred only (Dr. GRPO)")
    temperature: float = setting(1.0, "sampling temperature (log pi_old is taken at temperature 1, "
                                      "so keep 1 for exact ratios)")
    max_new_tokens: int = setting(64, "longest sampled completion")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = setting(0, "seed of the prompt order and of the sampling")
    eval_every: int = setting(10, "evaluate every N rollout steps (and always at the start and the "
                                  "end)")
    progress: bool = setting(True, "show a tqdm progress bar")

    def check(self) -> None:
        """Refuse settings that cannot run, naming the setting."""
        for name in ("steps", "prompts_per_step", "minibatch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: a group needs >= 2 samples to compare")
        if (self.lr <= 0 or self.eps_low < 0 or self.eps_low >= 1 or self.eps_high < 0
                or self.kl_coef < 0):
            raise ValueError(f"need lr > 0, 0 <= eps_low < 1, eps_high >= 0, kl_coef >= 0 "
                             f"(got lr={self.lr}, eps_low={self.eps_low}, "
                             f"eps_high={self.eps_high}, kl_coef={self.kl_coef})")
        if self.temperature <= 0 or self.eval_every < 0 or self.grad_clip < 0:
            raise ValueError("need temperature > 0, eval_every >= 0, grad_clip >= 0")


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """``[groups, group_size]`` rewards -> advantages of the same shape: reward minus its group's
    mean, divided by the group's unbiased std (over G - 1, ``torch.std``'s default; +1e-4) when
    ``scale``: rewards [1, 0, 0, 1] give +-0.866. Equal rewards give exactly 0."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-4) if scale else centred


def _prompt(row: dict):
    """The prompt of a row: ``prompt`` (text or messages), or ``messages`` but the last turn."""
    if row.get("prompt") is not None:
        return row["prompt"]
    if row.get("messages"):
        return row["messages"][:-1]
    raise ValueError(f"a prompt row needs 'prompt' or 'messages', got keys {sorted(row)}")


def grpo(lm, prompts: list, reward_fn, cfg: GRPOConfig, eval_fn=None, out_dir=None,
         on_step=None) -> dict:
    """Train ``lm`` in place with GRPO; return ``{"history": [...], "evals": [...]}``.

    ``prompts``: rows with a ``prompt`` or ``messages`` (``_prompt``) and whatever
    ``reward_fn(row, completion_text) -> float`` needs. ``history``: a record per rollout step
    (``_update``: reward, accuracy, sampler entropy, clip fractions, ...; ``tokens_per_s`` of the
    whole step). ``eval_fn(lm) -> dict`` runs at step 0, every ``eval_every`` steps and at the end.
    With ``out_dir``: ``history.jsonl``, ``evals.jsonl``, ``config.json`` and ``final/``."""
    cfg.check()
    if not prompts:
        raise ValueError("no prompts to sample from")
    torch.manual_seed(cfg.seed)
    ref = lm.frozen_copy() if cfg.kl_coef > 0 else None
    opt = adamw([p for p in lm.model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + 17)
    history, evals, order = [], [], []
    _evaluate(lm, eval_fn, 0, evals)
    for step in tqdm(range(1, cfg.steps + 1), disable=not cfg.progress, desc="grpo",
                     dynamic_ncols=True):
        t0 = time.perf_counter()
        while len(order) < cfg.prompts_per_step:  # a fresh shuffle of the pool whenever it runs out
            order += torch.randperm(len(prompts), generator=gen).tolist()
        rows, order = ([prompts[i] for i in order[:cfg.prompts_per_step]],
                       order[cfg.prompts_per_step:])
        pairs, rewards = _sample(lm, rows, reward_fn, cfg, step)
        history.append(_update(lm, opt, ref, pairs, rewards, cfg, gen, step))
        history[-1]["tokens_per_s"] = sum(len(c) for _, c in pairs) / (time.perf_counter() - t0)
        if on_step is not None:
            on_step(history[-1])
        if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
            _evaluate(lm, eval_fn, step, evals)
    if out is not None:
        for name, recs in (("history", history), ("evals", evals)):
            (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        lm.save_pretrained(out / "final")
    return {"history": history, "evals": evals}


def _evaluate(lm, eval_fn, step: int, evals: list) -> None:
    """Append ``eval_fn``'s record at ``step`` (in eval mode); leave the model in train mode."""
    if eval_fn is not None:
        lm.model.eval()
        evals.append({"step": step, **eval_fn(lm)})
    lm.model.train()


def _sample(lm, rows: list, reward_fn, cfg: GRPOConfig, step: int) -> tuple:
    """The rollout: ``group_size`` samples (token ids) per prompt of ``rows``, and their rewards."""
    pairs = lm.sample_ids([_prompt(r) for r in rows for _ in range(cfg.group_size)],
                          cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
                          batch_size=256)
    texts = lm.tokenizer.batch_decode([c for _, c in pairs], skip_special_tokens=True)
    rewards = torch.tensor([float(reward_fn(rows[i // cfg.group_size], t))
                            for i, t in enumerate(texts)])
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:  # a NaN reward would silently turn its whole group's advantages into NaN
        i = bad[0]
        raise ValueError(f"rollout step {step}: reward_fn returned {rewards[i].item()} for "
                         f"{len(bad)} sample(s), first for prompt "
                         f"{_prompt(rows[i // cfg.group_size])!r} and completion {texts[i]!r}")
    empty = [i for i, (_, c) in enumerate(pairs) if not c]
    # only a model that can never end its text gets here (max_new_tokens >= 1, EOS kept)
    if empty:
        raise ValueError(f"rollout step {step}: samples {empty[:5]} have no completion token")
    return pairs, rewards


def _update(lm, opt, ref, pairs: list, rewards, cfg: GRPOConfig, gen, step: int) -> dict:
    """Score each sample against its group, freeze the sampler as pi_old, take ``ppo_epochs``
    passes of minibatch steps; return the step's record (all but ``tokens_per_s``)."""
    adv = group_advantages(rewards.view(-1, cfg.group_size), cfg.scale_rewards)
    zero_groups = (adv.abs() < 1e-8).all(dim=1)
    adv = adv.flatten()
    examples = [{"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)}
                for p, c in pairs]
    mb_idx = chunks(torch.randperm(len(examples), generator=gen).tolist(), cfg.minibatch_size)
    minibatches = [lm.collate([examples[i] for i in idx]) for idx in mb_idx]
    with torch.no_grad():  # pi_old: the sampler's log-probs (and entropy)
        old = [lm.token_logprobs(mb, with_entropy=True) for mb in minibatches]
        ref_lp = [None if ref is None else lm.token_logprobs(mb, model=ref)[0]
                  for mb in minibatches]
    parts, grad_norms = [], []
    for _ in range(cfg.ppo_epochs):  # several optimizer steps on the same rollout
        for j, (idx, mb) in enumerate(zip(mb_idx, minibatches)):
            a = adv[idx].to(lm.device)
            if cfg.kl_coef == 0 and bool((a.abs() < 1e-8).all()):
                continue  # no gradient here; an AdamW step would still move the weights
            metrics, grad_norm = _optimizer_step(lm, opt, mb, old[j][0], a, ref_lp[j], cfg, step)
            parts.append(metrics)
            grad_norms.append(grad_norm)
    n_completion = sum(len(c) for _, c in pairs)
    entropy = sum((e * mb["completion_mask"]).sum().item()
                  for (_, e), mb in zip(old, minibatches)) / n_completion
    return {"step": step, "reward": rewards.mean().item(),
            "accuracy": (rewards > 0).float().mean().item(),
            "entropy": entropy, "completion_length": n_completion / len(pairs),
            "zero_adv_groups": zero_groups.float().mean().item(), "updates": len(parts),
            # a rollout whose groups all tied took no step: nothing clipped, no ratio to report
            "clipfrac": 0.0, "clipfrac_high": 0.0, "clipfrac_low": 0.0, "ratio_mean": None,
            "ratio_max": None, "approx_kl": None, "loss": None,
            **(merge_metrics(parts) if parts else {}),
            "grad_norm": max(grad_norms) if grad_norms else None}


def _optimizer_step(lm, opt, mb: dict, logp_old, advantages, logp_ref, cfg: GRPOConfig,
                    step: int) -> tuple:
    """One optimizer step: the clipped surrogate (+ ``kl_coef`` x k3 KL); metrics, grad norm."""
    mask = mb["completion_mask"]
    logp = lm.token_logprobs(mb)[0]
    loss, metrics = clipped_surrogate(logp, logp_old, advantages, mask, cfg.eps_low, cfg.eps_high)
    if logp_ref is not None:
        kl = masked_mean(kl_terms(logp, logp_ref), mask.to(logp.dtype))
        loss = loss + cfg.kl_coef * kl
        metrics["kl"] = kl.item()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(lm.model.parameters(), cfg.grad_clip or float("inf"))
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):  # before the step spoils weights
        raise FloatingPointError(f"non-finite loss or gradient at rollout step {step}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {**metrics, "loss": loss.item()}, grad_norm.item()
