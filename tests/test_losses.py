"""Losses: analytic gradients, the clip, metrics on hand-made numbers, masks and bad input."""
import math

import pytest
import torch

from minipsft.losses import clipped_surrogate, dft_loss, psft_loss, sft_kl_loss, sft_loss


def _grad(loss_fn, logp):
    logp = logp.clone().requires_grad_(True)
    loss, metrics = loss_fn(logp)
    loss.backward()
    return logp.grad, loss, metrics


def test_psft_gradient_equals_sft_gradient_at_ratio_one():
    torch.manual_seed(0)
    logp = -torch.rand(3, 5) * 3
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    g_sft, *_ = _grad(lambda lp: sft_loss(lp, mask), logp)
    g_psft, _, m = _grad(lambda lp: psft_loss(lp, lp.detach(), mask), logp)
    torch.testing.assert_close(g_psft, g_sft)
    assert m["clipfrac"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0) and m["approx_kl"] == pytest.approx(0.0)


def test_clip_zeroes_only_tokens_above_one_plus_eps_high():
    ratios = torch.tensor([[1.5, 1.0, 0.5, 1.2]])  # above 1.28, at 1, below 0.8, inside
    logp_old = torch.full((1, 4), -1.0)
    logp = logp_old + ratios.log()
    mask = torch.ones(1, 4)
    g, loss, m = _grad(lambda lp: psft_loss(lp, logp_old, mask, 0.2, 0.28), logp)
    # d/dlogp of -mean(r) is -r/N where not clipped, 0 where clipped; r < 1-eps_low keeps its gradient (A > 0)
    torch.testing.assert_close(g, torch.tensor([[0.0, -1.0, -0.5, -1.2]]) / 4)
    assert loss.item() == pytest.approx(-(1.28 + 1.0 + 0.5 + 1.2) / 4, rel=1e-6)
    assert m["clipfrac"] == pytest.approx(0.25) and m["clipfrac_high"] == pytest.approx(0.25)
    assert m["clipfrac_low"] == 0.0
    assert m["ratio_mean"] == pytest.approx((1.5 + 1.0 + 0.5 + 1.2) / 4, rel=1e-6)
    assert m["ratio_max"] == pytest.approx(1.5, rel=1e-6)
    k3 = sum(r - 1 - math.log(r) for r in (1.5, 1.0, 0.5, 1.2)) / 4
    assert m["approx_kl"] == pytest.approx(k3, rel=1e-5)
    assert m["num_tokens"] == 4


def test_negative_advantage_clips_below_one_minus_eps_low():
    ratios = torch.tensor([[0.5, 1.5, 1.0]])
    logp_old = torch.zeros(1, 3)
    g, _, m = _grad(lambda lp: clipped_surrogate(lp, logp_old, -2.0, torch.ones(1, 3), 0.2, 0.28), ratios.log())
    # -min(r A, clip(r) A) with A = -2 is 2*max(r, clip(r)): zero gradient below 0.8, 2r/N elsewhere
    torch.testing.assert_close(g, torch.tensor([[0.0, 3.0, 2.0]]) / 3)
    assert m["clipfrac_low"] == pytest.approx(1 / 3) and m["clipfrac_high"] == 0.0


def test_per_sequence_advantages_broadcast_over_tokens():
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -0.5])
    g, loss, _ = _grad(lambda lp: clipped_surrogate(lp, lp.detach(), adv, torch.ones(2, 3)), logp)
    torch.testing.assert_close(g, torch.tensor([[-1.0] * 3, [0.5] * 3]) / 6)
    assert loss.item() == pytest.approx(-(3 * 1.0 - 3 * 0.5) / 6)


def test_dft_gradient_is_probability_times_nll_gradient():
    logp = torch.log(torch.tensor([[0.9, 0.1, 0.5]]))
    mask = torch.tensor([[1, 1, 0]])
    g, loss, _ = _grad(lambda lp: dft_loss(lp, mask), logp)
    torch.testing.assert_close(g, torch.tensor([[-0.9, -0.1, 0.0]]) / 2)
    assert loss.item() == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / 2, rel=1e-6)


def test_sft_kl_known_values_and_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    logp_ref = torch.log(torch.tensor([[0.25, 0.2]]))
    mask = torch.ones(1, 2)
    g, loss, m = _grad(lambda lp: sft_kl_loss(lp, logp_ref, mask, kl_coef=0.5), logp)
    k3 = (0.5 - math.log(0.5) - 1) / 2  # token 1: ref/pi = 0.5; token 2: equal -> 0
    assert m["kl"] == pytest.approx(k3, rel=1e-6)
    assert m["nll"] == pytest.approx(-(math.log(0.5) + math.log(0.2)) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(m["nll"] + 0.5 * k3, rel=1e-6)
    # gradient per token: (-1 + kl_coef * (1 - ref/pi)) / N
    torch.testing.assert_close(g, torch.tensor([[-1 + 0.5 * 0.5, -1.0]]) / 2)


@pytest.mark.parametrize("name", ["sft", "psft", "dft", "sft_kl"])
def test_prompt_and_padding_tokens_contribute_nothing(name):
    torch.manual_seed(1)
    fns = {"sft": lambda lp, m: sft_loss(lp, m), "psft": lambda lp, m: psft_loss(lp, torch.zeros_like(lp), m),
           "dft": lambda lp, m: dft_loss(lp, m), "sft_kl": lambda lp, m: sft_kl_loss(lp, torch.zeros_like(lp) - 1, m)}
    mask = torch.tensor([[0, 0, 1, 1, 0, 0]])
    logp = -torch.rand(1, 6)
    garbage = logp.clone()
    garbage[mask == 0] = -50.0
    g1, l1, _ = _grad(lambda lp: fns[name](lp, mask), logp)
    g2, l2, _ = _grad(lambda lp: fns[name](lp, mask), garbage)
    assert l1.item() == pytest.approx(l2.item())
    assert (g1[mask == 0] == 0).all() and (g2[mask == 0] == 0).all()


@pytest.mark.parametrize("call", [
    lambda lp, m: sft_loss(lp, m), lambda lp, m: dft_loss(lp, m),
    lambda lp, m: psft_loss(lp, lp.detach(), m), lambda lp, m: sft_kl_loss(lp, lp.detach(), m),
    lambda lp, m: clipped_surrogate(lp, lp.detach(), 1.0, m)])
def test_empty_completion_mask_raises(call):
    with pytest.raises(ValueError, match="no completion token"):
        call(torch.zeros(2, 3), torch.zeros(2, 3))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="logp_old has shape"):
        psft_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask has shape"):
        sft_loss(torch.zeros(2, 3), torch.ones(3, 2))


def test_a_loss_added_to_the_registry_trains_without_touching_the_loop(monkeypatch, capsys):
    """One function plus one LOSSES entry: the loop (default and fused head), the CLI's --method
    choices and the figures' colours pick it up."""
    from conftest import addition_rows, tiny_lm
    from minipsft.cli import build_parser
    from minipsft.losses import LOSSES, Loss, masked_mean
    from minipsft.model import CausalLM
    from minipsft.train import TrainConfig, train

    def half_nll_terms(logp):  # a new loss: half of SFT's
        return -0.5 * logp

    monkeypatch.setitem(LOSSES, "half_sft", Loss(
        lambda logp, mask, old, ref, s: (masked_mean(half_nll_terms(logp), mask.float()),
                                         {"num_tokens": int(mask.sum())}),
        lambda logp, old, ref, s: half_nll_terms(logp), "half SFT", "tab:pink"))
    histories = []
    for fused in (False, True):
        base = tiny_lm()
        lm = CausalLM(base.model, base.tokenizer, device="cpu", fused_head=fused)
        cfg = TrainConfig(method="half_sft", epochs=1, batch_size=8, minibatch_size=4, lr=1e-2,
                          progress=False)
        histories.append(train(lm, lm.encode(addition_rows(16)), cfg)["history"])
    sft = train(tiny_lm(), tiny_lm().encode(addition_rows(16)),
                TrainConfig(method="sft", epochs=1, batch_size=8, minibatch_size=4, lr=1e-2,
                            progress=False))["history"]
    assert histories[0][0]["loss"] == pytest.approx(0.5 * sft[0]["loss"], rel=1e-6)
    assert [r["loss"] for r in histories[0]] == pytest.approx([r["loss"] for r in histories[1]],
                                                               rel=1e-4)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "half_sft" in capsys.readouterr().out
