"""The anchored losses (ASFT and SFT+KL over the whole vocabulary): their value and gradient equal
the ASFT authors' code, the chunked KL equals the dense one, the LoRA reference (adapter off) is
the starting model, and ``train --method asft`` runs with the anchor acting."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import addition_rows, tiny_lm
from minipsft import logprobs, speed
from minipsft.cli import main
from minipsft.losses import LOSSES
from minipsft.model import CausalLM
from minipsft.train import TrainConfig

IGNORE_INDEX = -100


def authors_loss(logits, ref_logits, labels, mode: str, kl_weight: float = 0.1):
    """zhuchichi56/ASFT train_v2.py, ``EnhancedTrainer.compute_loss``, modes ``asft`` and
    ``sft+kl``, rewritten for shifted [N, V] logits and [N] labels."""
    valid_mask = labels != IGNORE_INDEX
    token_losses = torch.nn.CrossEntropyLoss(reduction="none")(logits, labels)
    kl_div = F.kl_div(F.log_softmax(logits, dim=-1), F.softmax(ref_logits, dim=-1),
                      reduction="none").sum(dim=-1)
    if mode == "asft":
        probs = torch.softmax(logits, dim=-1)
        valid_labels = torch.clamp(labels, min=0, max=probs.size(-1) - 1)
        weights = probs.gather(1, valid_labels.unsqueeze(-1)).squeeze(-1).detach()
        token_losses = token_losses * weights
    weighted_losses = token_losses + kl_weight * kl_div
    return weighted_losses[valid_mask].sum() / valid_mask.sum()


@pytest.mark.parametrize("method, mode", [("asft", "asft"), ("sft_kl_vocab", "sft+kl")])
def test_value_and_gradient_equal_the_authors_code(method, mode):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 50
    logits = (3 * torch.randn(B, T, V, generator=g)).requires_grad_()
    ref_logits = logits.detach() + torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[:, :2] = 0  # a prompt
    mask[2, 5:] = 0  # padding
    labels = labels.masked_fill(mask == 0, IGNORE_INDEX)

    expected = authors_loss(logits.reshape(-1, V), ref_logits.reshape(-1, V), labels.reshape(-1),
                            mode)
    (grad_expected,) = torch.autograd.grad(expected, logits)

    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    kl = logprobs.vocab_kl(logp_all, torch.log_softmax(ref_logits, dim=-1))
    loss, metrics = LOSSES[method].loss(logp, mask, None, kl, TrainConfig(method=method))
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, grad_expected, atol=1e-6, rtol=1e-6)
    assert metrics["kl"] > 0.1 and metrics["num_tokens"] == int(mask.sum())
    # the per-token terms (what the loop's diagnostics and any fused path use) give the same mean
    terms = LOSSES[method].terms(logp, None, kl, TrainConfig(method=method))
    torch.testing.assert_close((terms * mask).sum() / mask.sum(), expected, atol=1e-6, rtol=1e-6)


def _reference(lm, seed=1):
    ref = copy.deepcopy(lm.model)
    with torch.no_grad():  # away from the model, so that the KL is not zero
        g = torch.Generator().manual_seed(seed)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return ref


def test_chunked_kl_equals_the_dense_one_one_chunk_of_logits_at_a_time():
    lm = tiny_lm()
    batch = lm.collate(lm.encode(addition_rows(6)))
    ids, attn = batch["input_ids"], batch["attention_mask"]
    ref = _reference(lm)
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=attn).logits
    dense = logprobs.token_logprobs_kl(lm.model, ids, attn, ref_logits)
    dense[2].sum().backward()
    grads = [p.grad.clone() for p in lm.model.parameters()]
    lm.model.zero_grad()

    shapes = []
    hooks = [speed.fast_head(m).register_forward_hook(lambda mod, i, out: shapes.append(out.shape))
             for m in (lm.model, ref)]
    V, step = len(lm.tokenizer), 3
    with torch.no_grad():
        ref_hidden = speed.decoder_hidden(ref, ids, attn)
    chunked = speed.token_logprobs_kl(lm.model, ids, attn, ref_hidden, speed.fast_head(ref),
                                      chunk_elements=len(ids) * V * step)
    chunked[2].sum().backward()
    for h in hooks:
        h.remove()
    for got, expected in zip(chunked, dense):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for p, g in zip(lm.model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    assert dense[2][batch["completion_mask"] == 1].min() > 0  # the KL acts at every position
    assert shapes and max(s[1] for s in shapes) <= step  # no [B, T, V] logits beyond a chunk


@pytest.mark.parametrize("speed_on", [False, True])
def test_lora_reference_is_the_adapter_off_and_equals_a_frozen_copy(speed_on):
    base = tiny_lm()
    lm = CausalLM(base.model, base.tokenizer, device="cpu", speed=speed_on)
    starting = CausalLM(copy.deepcopy(base.model), base.tokenizer, device="cpu")
    lm.add_lora(r=4)
    reference = lm.reference()
    assert reference.copy is None  # a fresh adapter: the model itself, its adapter off, no copy
    with torch.no_grad():  # the adapter trains away from its zero start
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(4))
    batch = lm.collate(lm.encode(addition_rows(6)))
    with torch.no_grad():
        expected = starting.token_logprobs(batch)[0]
        now = lm.token_logprobs(batch)[0]
    torch.testing.assert_close(reference.logprobs(batch), expected, atol=1e-6, rtol=1e-6)
    assert (now - expected).abs().max() > 1e-3  # the adapter is on everywhere else
    with torch.no_grad():
        ref_logits = starting.model(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).logits
        dense = logprobs.token_logprobs_kl(lm.model, batch["input_ids"],
                                           batch["attention_mask"], ref_logits)
    shapes = []
    hook = speed.fast_head(lm.model).register_forward_hook(
        lambda mod, i, out: shapes.append(out.shape))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(speed, "CHUNK_ELEMENTS", len(batch["input_ids"]) * len(lm.tokenizer) * 2)
        logp, entropy, kl = lm.token_logprobs_kl(batch, reference)
    hook.remove()
    torch.testing.assert_close(kl.detach(), dense[2], atol=1e-5, rtol=1e-5)
    assert kl.requires_grad
    if speed_on:  # the model's and the reference's logits, two positions at a time
        assert len(shapes) > 2 and max(s[1] for s in shapes) <= 2


@pytest.mark.parametrize("method, mode", [("asft", "asft"), ("sft_kl_vocab", "sft+kl")])
def test_the_loops_micro_step_gives_the_authors_loss_on_a_models_logits(method, mode):
    from minipsft.train import Objective, micro_step, token_weights

    lm = tiny_lm()
    lm.model.eval()  # no dropout: one forward is comparable with another
    batch = lm.collate(lm.encode(addition_rows(6)))
    reference = lm.reference()
    reference.copy = _reference(lm)  # a starting model away from the current one
    ids, attn = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        ref_logits = reference.copy(input_ids=ids, attention_mask=attn).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, IGNORE_INDEX)
    V = logits.shape[-1]
    expected = authors_loss(logits.reshape(-1, V), ref_logits.reshape(-1, V), labels.reshape(-1),
                            mode)
    weights = token_weights(batch["completion_mask"])
    cfg = TrainConfig(method=method)
    objective = Objective(LOSSES[method], cfg, weights, None, None, reference)
    record = micro_step(lm, objective, batch, weights.sum(), None, 0)
    assert record["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_train_method_asft_runs_and_its_anchor_acts(saved_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(16)))
    out = tmp_path / "run"
    main(["train", "--model", str(saved_model_dir), "--data", str(data), "--method", "asft",
          "--epochs", "2", "--lr", "3e-3", "--batch-size", "8", "--minibatch-size", "2",
          "--vocab-kl-coef", "0.1", "--out", str(out), "--no-progress"])
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["method"] for r in history] == ["asft"] * 16
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the starting model is pi_ref
    assert min(r["kl"] for r in history[1:]) > 0  # then the anchor acts


def test_the_family_bench_per_base_and_pooled_at_smoke_size(tmp_path, smoke_cache):
    from minipsft.lab.family import family, write_family
    from minipsft.lab.runner import reproduce

    folders = [tmp_path / "family_a", tmp_path / "family_b"]
    reproduce("smoke", folders[0], cache_dir=smoke_cache, ablations=["family"], main=False,
              seeds=[0], epochs=2)  # two epochs: the wiring, not the numbers
    data = json.loads((folders[0] / "results.json").read_text())
    folders[1].mkdir()  # a second base, as far as family() can tell: its results under a name
    data["summary"]["preset_config"]["pretrain_seed"] = 77
    (folders[1] / "results.json").write_text(json.dumps(data))
    records = data["records"]
    assert {r["method"] for r in records} == {"psft", "sft", "sft_paper", "asft", "sft_kl_vocab"}
    assert (folders[0] / "family.png").stat().st_size > 20_000
    summary = family(folders)
    smoke_seed = str(data["summary"]["preset_config"]["base"]["pretrain_seed"])
    assert list(summary["bases"]) == [smoke_seed, "77"]
    pooled = summary["pooled"]["asft - sft"]["last_ood"]
    assert pooled["seeds"] == 2  # every (base, seed) pair
    per_base = [summary["bases"][b]["comparisons"]["asft - sft"]["last_ood"]["diff"]
                for b in (smoke_seed, "77")]
    assert pooled["diff"] == pytest.approx(sum(per_base) / 2)
    one_base = summary["bases"]["77"]["comparisons"]["asft - sft"]["last_ood"]
    assert one_base["hi"] == float("inf") and pooled["hi"] < float("inf")  # 1 seed vs 2 pairs
    files = write_family(tmp_path / "out", summary)
    text = (tmp_path / "out" / "family.md").read_text()
    assert files == ["family.json", "family.md"] and "| asft - psft |" in text


def test_family_beside_a_committed_main_comparison_pairs_the_new_arm_by_seed(tmp_path):
    from pathlib import Path

    from minipsft.lab.family import beside

    main_folder = Path(__file__).parents[1] / "results" / "real_cpu_smollm2"
    data = json.loads((main_folder / "results.json").read_text())
    extra = [dict(r, method="asft") for r in data["records"] if r["method"] == "psft"]
    summary = dict(data["summary"], preset_config=dict(data["summary"]["preset_config"],
                                                       arms=["asft"]))
    (tmp_path / "results.json").write_text(json.dumps({"summary": summary, "records": extra}))
    b = beside(main_folder, tmp_path)  # "asft" here is PSFT's own records under another name
    assert list(b["comparisons"]) == ["asft - sft", "asft - psft"]
    same = b["comparisons"]["asft - psft"]["last_ood"]
    assert same["diff"] == 0 and same["seeds"] == 3
    versus_sft = b["comparisons"]["asft - sft"]["last_id"]
    psft, sft = ({r["seed"]: r["id_acc"] for r in data["records"]
                  if r["method"] == a and r["epoch"] == 3} for a in ("psft", "sft"))
    assert versus_sft["diff"] == pytest.approx(sum(psft[s] - sft[s] for s in psft) / 3)
    summary["preset_config"]["lr"] *= 2  # another lr: not the same comparison
    (tmp_path / "results.json").write_text(json.dumps({"summary": summary, "records": extra}))
    with pytest.raises(ValueError, match="differ in lr"):
        beside(main_folder, tmp_path)


def test_compare_takes_the_anchored_arms():
    from minipsft.cli import build_parser

    args = build_parser().parse_args(["compare", "--model", "m", "--train", "t.jsonl", "--test",
                                      "v.jsonl", "--arms", "psft", "asft", "sft_kl_vocab",
                                      "--out", "o"])
    assert args.arms == ["psft", "asft", "sft_kl_vocab"]
