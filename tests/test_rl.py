"""GRPO: group advantages, the shared clipped surrogate, the rollout loop, and reproduce-rl end to end."""
import json
import subprocess
import sys

import pytest
import torch

from minipsft.losses import clipped_surrogate
from minipsft.lab.rl import GRPOConfig, group_advantages, grpo

from conftest import tiny_lm

PROMPTS = [{"prompt": w + ":"} for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")]


def starts_with_digit(row, text):
    """A task a random tiny model can learn in a few dozen steps: begin the answer with a digit."""
    return float(text[:1].isdigit())


def params(lm):
    return [p.detach().clone() for p in lm.model.parameters()]


def test_group_advantages_known_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as GRPO/TRL
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (std + 1e-4)
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], expected[0])
    assert torch.equal(adv[1], torch.zeros(4))  # equal rewards: exactly zero
    assert torch.equal(group_advantages(rewards, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_equal_rewards_give_no_gradient():
    torch.manual_seed(0)
    logp = (torch.randn(4, 6) - 2).requires_grad_()
    logp_old = logp.detach() + 0.3 * torch.randn(4, 6)  # ratios away from 1: the clip could act
    adv = group_advantages(torch.full((1, 4), 0.7)).flatten()
    loss, _ = clipped_surrogate(logp, logp_old, adv, torch.ones(4, 6))
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_surrogate_at_ratio_one_is_the_group_baseline_policy_gradient():
    """Fresh pi_old (ratio 1): d loss / d logp_it = -A_i / N, i.e. REINFORCE with the group mean as baseline."""
    torch.manual_seed(0)
    logp = (torch.randn(4, 5) - 1).requires_grad_()
    mask = torch.ones(4, 5)
    mask[0, 3:] = 0
    adv = group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]])).flatten()
    loss, m = clipped_surrogate(logp, logp.detach(), adv, mask)
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None] * mask / mask.sum())
    assert m["clipfrac"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0)


def test_constant_reward_takes_no_step():
    lm = tiny_lm(chat=False)
    before = params(lm)
    res = grpo(lm, PROMPTS, lambda row, text: 1.0,
               GRPOConfig(steps=2, prompts_per_step=4, group_size=4, minibatch_size=8, max_new_tokens=4,
                          lr=1e-2, progress=False))
    assert all(h["updates"] == 0 and h["zero_adv_groups"] == 1.0 for h in res["history"])
    assert all(torch.equal(a, b) for a, b in zip(before, params(lm)))


def test_grpo_raises_the_reward_and_both_clip_bounds_act():
    lm = tiny_lm(chat=False)
    cfg = GRPOConfig(steps=30, prompts_per_step=8, group_size=8, minibatch_size=16, max_new_tokens=3, lr=1e-2,
                     eval_every=15, progress=False)
    evals = []
    res = grpo(lm, PROMPTS, starts_with_digit, cfg, eval_fn=lambda lm: {"n": len(evals)})
    h = res["history"]
    first, last = (sum(x["reward"] for x in part) / len(part) for part in (h[:5], h[-5:]))
    assert first < 0.5 and last > first + 0.3, (first, last)
    assert max(x["clipfrac_high"] for x in h) > 0 and max(x["clipfrac_low"] for x in h) > 0
    assert all(x["updates"] <= 4 for x in h)  # 64 samples / minibatch 16
    assert [e["step"] for e in res["evals"]] == [0, 15, 30]
    for key in ("reward", "accuracy", "entropy", "clipfrac", "clipfrac_high", "clipfrac_low", "completion_length",
                "tokens_per_s", "approx_kl", "grad_norm"):
        assert key in h[-1]


def test_one_minibatch_per_rollout_never_clips():
    """pi_old = the sampler and one step per rollout: ratio exactly 1, the clip cannot act."""
    lm = tiny_lm(chat=False)
    res = grpo(lm, PROMPTS, starts_with_digit, GRPOConfig(steps=4, prompts_per_step=4, group_size=4, minibatch_size=16,
                                                          max_new_tokens=3, lr=1e-2, progress=False))
    stepped = [h for h in res["history"] if h["updates"]]
    assert stepped and all(h["clipfrac"] == 0 and h["ratio_mean"] == pytest.approx(1.0, abs=1e-6) for h in stepped)


def test_non_finite_reward_is_a_clear_error_before_any_step():
    lm = tiny_lm(chat=False)
    before = params(lm)
    with pytest.raises(ValueError, match="reward_fn returned nan .* prompt 'ab:'"):
        grpo(lm, PROMPTS, lambda row, text: float("nan") if row["prompt"] == "ab:" else 0.0,
             GRPOConfig(steps=1, prompts_per_step=8, group_size=4, minibatch_size=32, max_new_tokens=3, progress=False))
    assert all(torch.equal(a, b) for a, b in zip(before, params(lm)))


def test_kl_term_is_logged_when_on():
    lm = tiny_lm(chat=False)
    res = grpo(lm, PROMPTS, starts_with_digit, GRPOConfig(steps=2, prompts_per_step=4, group_size=4, minibatch_size=8,
                                                          max_new_tokens=3, lr=1e-2, kl_coef=0.1, progress=False))
    assert all(h["kl"] >= 0 for h in res["history"]) and res["history"][-1]["kl"] > 0


@pytest.mark.parametrize("bad, msg", [(dict(group_size=1), "group_size"), (dict(steps=0), "steps"),
                                      (dict(eps_low=1.0), "eps_low"), (dict(minibatch_size=0), "minibatch_size")])
def test_bad_settings_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        grpo(tiny_lm(chat=False), PROMPTS, starts_with_digit, GRPOConfig(progress=False, **bad))


def test_no_prompts_is_an_error():
    with pytest.raises(ValueError, match="no prompts"):
        grpo(tiny_lm(chat=False), [], starts_with_digit, GRPOConfig(progress=False))


def test_sampled_ids_stop_at_eos_and_decode_like_generate():
    lm = tiny_lm(chat=False)
    prompts = [r["prompt"] for r in PROMPTS]
    pairs = lm.sample_ids(prompts, max_new_tokens=6, do_sample=False)
    eos = lm.tokenizer.eos_token_id
    for prompt, (p, c) in zip(prompts, pairs):
        assert p == lm.prompt_ids(prompt)
        assert 1 <= len(c) <= 6 and eos not in c[:-1]
    texts = lm.tokenizer.batch_decode([c for _, c in pairs], skip_special_tokens=True)
    assert texts == lm.generate(prompts, max_new_tokens=6)


def test_reproduce_rl_smoke_writes_results_and_figure_and_resumes(tmp_path, smoke_cache):
    out = tmp_path / "rl"
    argv = [sys.executable, "-m", "minipsft", "reproduce-rl", "--preset", "smoke", "--out", str(out),
            "--cache", str(smoke_cache), "--set", "steps=4", "--set", "eval_every=2"]
    stopped = subprocess.run(argv + ["--max-minutes", "0"], capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 3 and "runs remain" in stopped.stdout, stopped.stderr[-2000:]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    recs = data["records"]
    assert {r["start"] for r in recs} == {"base", "sft_paper", "sft", "psft"}
    assert sorted({r["step"] for r in recs}) == [0, 2, 4]
    for key in ("start", "seed", "step", "reward", "id_acc", "ood_acc", "entropy", "sample_entropy"):
        assert all(key in r for r in recs)
    best = data["summary"]["best_checkpoints"]
    assert set(best) == {"sft_paper-s0", "sft-s0", "psft-s0"} and all(v["epoch"] >= 1 for v in best.values())
    assert (out / "rl_after_finetuning.png").stat().st_size > 10_000
    assert (out / "finetune" / "results.json").exists() and (out / "report.md").exists()
    assert len(list((out / "histories").glob("*.jsonl"))) == 4
    # a run lost (as at a kill): the same command runs it alone and ends with the same records
    (out / "runs" / "psft-s0.json").unlink()
    (out / "results.json").unlink()
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "3 of 4 runs done, 1 to run" in resumed.stdout
    assert json.loads((out / "results.json").read_text())["records"] == recs
    # other RL settings are refused without --overwrite; with it, the fine-tuning is reused
    refused = subprocess.run(argv[:-4] + ["--set", "steps=2", "--set", "eval_every=2"],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and "rl_config.steps" in refused.stderr
    again = subprocess.run(argv[:-4] + ["--set", "steps=2", "--set", "eval_every=2", "--overwrite"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "reusing the fine-tuned checkpoints" in again.stdout, again.stderr[-2000:]
    assert sorted({r["step"] for r in json.loads((out / "results.json").read_text())["records"]}) == [0, 2]


def test_reproduce_rl_rejects_unknown_preset_settings(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minipsft", "reproduce-rl", "--preset", "smoke", "--out",
                           str(tmp_path), "--set", "nonsense=3"], capture_output=True, text=True)
    assert proc.returncode != 0 and "nonsense" in proc.stderr


def test_grpo_on_gsm8k_rows_through_the_chat_template():
    """Real-model path on the tiny chat model: conversational GSM8K rows, exact-match reward."""
    from pathlib import Path

    from minipsft.lab import real

    rows = real.gsm8k_rows(real.load_split("openai/gsm8k", "main", "test",
                                           path=Path(__file__).parent / "fixtures" / "gsm8k_test.jsonl"))
    assert real.gsm8k_reward(rows[0], "so it is #### 72") == 1.0 and real.gsm8k_reward(rows[0], "71") == 0.0
    lm = tiny_lm(max_positions=512)
    res = grpo(lm, rows, real.gsm8k_reward, GRPOConfig(steps=2, prompts_per_step=2, group_size=2, minibatch_size=4,
                                                       max_new_tokens=4, progress=False))
    assert len(res["history"]) == 2 and all(h["completion_length"] <= 4 for h in res["history"])
    with pytest.raises(ValueError, match="'prompt' or 'messages'"):
        grpo(lm, [{"question": "no prompt"}], real.gsm8k_reward, GRPOConfig(steps=1, progress=False))
