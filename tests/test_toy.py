"""The toy world: task checkers, the teacher, the tokenizer, cached deterministic pretraining,
evaluation, and the smoke reproduction end to end (files and keys)."""
import json
import random
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from transformers import AutoTokenizer

from minipsft.lab import toy
from minipsft.lab.ablations import ABLATIONS, ablation_jobs
from minipsft.lab.presets import PRESETS, arm_config


def test_teacher_demonstrations_pass_their_own_checker():
    rows = toy.pretrain_rows(500, seed=0) + toy.id_rows(200, seed=1) + toy.ood_rows(10, seed=2)
    assert all(toy.is_correct(r, r["completion"]) for r in rows)
    assert {r["task"] for r in rows} == set(toy.PRIOR_TASKS) | {toy.ID_TASK}


def test_the_second_in_domain_task_sorts_longer_strings_in_the_same_style():
    """``sort_long``: 7-10 letters of a-j (pretraining sorted 3-6), the answer then the same
    reflection as the reversals; the reversal rows, and so every committed run, are unchanged."""
    import hashlib

    from minipsft.lab.presets import Preset
    from minipsft.lab.worlds import ToyWorld

    rows = toy.id_rows(200, seed=1, task="sort_long")
    assert all(toy.is_correct(r, r["completion"]) for r in rows)
    for r in rows:
        word = r["prompt"].removeprefix("sort ").removesuffix(":")
        assert 7 <= len(word) <= 10 and set(word) <= set(toy.LETTERS[:10])
        answer, tail = r["completion"].split(";")
        assert answer == "".join(sorted(word)) and f" {len(word)} letters " in tail
        assert r["task"] == "sort_long"
    assert not toy.is_correct(rows[0], rows[0]["prompt"][5:-1])  # the unsorted letters
    reversals = json.dumps(toy.id_rows(300, seed=10_000)).encode()
    assert hashlib.sha1(reversals).hexdigest()[:12] == "d02737a0c749"
    assert toy.BaseConfig().key() == "e758a1f29e9a"  # the shipped base's pretraining data
    assert ToyWorld(Preset(base=None, id_task="sort_long")).train_rows(0)[0]["task"] == "sort_long"
    with pytest.raises(ValueError, match="id_task 'count'"):
        ToyWorld(Preset(base=None, id_task="count"))


def test_checker_rejects_wrong_answers_and_missing_format():
    row = {"task": "sub", "answers": ["47"], "paren": True}
    assert toy.is_correct(row, "(it is 47)") and toy.is_correct(row, "(47)")
    assert not toy.is_correct(row, "47") and not toy.is_correct(row, "(46)")
    rev = {"task": "rev", "answers": ["cba"], "paren": False}
    assert toy.is_correct(rev, "it is cba") and not toy.is_correct(rev, "abc")
    pick = {"task": "pick", "answers": ["a", "b"], "paren": False}
    assert toy.is_correct(pick, "b") and not toy.is_correct(pick, "c")


def test_id_teacher_style_roles_and_randomness():
    rng = random.Random(0)
    text = toy.chain_of_thought("szycidp", rng)
    answer, tail = text.split(";")
    assert answer == "pdicyzs" and tail.split(" ")[0] in toy.OPENERS and " 7 letters " in tail
    roles = toy.completion_roles(text)
    assert len(roles) == len(text)
    assert [c for c, r in zip(text, roles) if r == "content"] == list("pdicyzs7")
    assert toy.completion_roles("(cba)") == ["content"] * 5  # a replayed prior task: no reflection
    # the teacher is stochastic: every reflection word appears
    texts = [toy.chain_of_thought("abcdefg", rng) for _ in range(100)]
    assert {t.split(";")[1].split(" ")[0] for t in texts} == set(toy.OPENERS)
    assert {t.rsplit(" ", 1)[1] for t in texts} == set(toy.CONNECTIVES)
    row = {"task": "rev", "answers": ["cba"], "paren": True}
    assert toy.is_correct(row, "(cba)") and not toy.is_correct(row, "(cba);hmm 3 letters ok")
    assert toy.is_correct(dict(row, paren=False), "cba;hmm 3 letters ok")


def test_tokenizer_covers_the_world_and_reloads(tmp_path):
    lm = toy.new_model(toy.BaseConfig(hidden=32, layers=1, heads=2))
    rows = toy.pretrain_rows(300, 0) + toy.id_rows(50, 1)
    unk = lm.tokenizer.unk_token_id
    assert all(unk not in e["input_ids"] for e in lm.encode(rows))
    lm.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.decode(tok(rows[0]["prompt"])["input_ids"]) == rows[0]["prompt"]


def test_pretraining_is_cached_and_deterministic(tmp_path):
    cfg = toy.BaseConfig(hidden=32, layers=1, heads=2, pretrain_rows=640, pretrain_batch=32)
    a, path_a, cached_a = toy.pretrained_base(cfg, tmp_path / "one", progress=False)
    b, path_b, cached_b = toy.pretrained_base(cfg, tmp_path / "two", progress=False)
    c, path_c, cached_c = toy.pretrained_base(cfg, tmp_path / "one", progress=False)
    assert (cached_a, cached_b, cached_c) == (False, False, True) and path_a == path_c
    for x, y, z in zip(a.model.parameters(), b.model.parameters(), c.model.parameters()):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
        torch.testing.assert_close(x, z, atol=0, rtol=0)
    other = toy.BaseConfig(hidden=32, layers=1, heads=2, pretrain_rows=640, pretrain_batch=32, pretrain_seed=1)
    assert other.key() != cfg.key()


def test_evaluator_measures_the_base_against_itself():
    lm = toy.new_model(toy.BaseConfig(hidden=32, layers=1, heads=2))
    ev = toy.Evaluator(lm, toy.id_rows(8, 1), toy.ood_rows(2, 2), n_samples=4)
    out = ev(lm)
    assert out["ood_kl"] == pytest.approx(0.0, abs=1e-6) and out["drift"] == 0.0
    for k in ("id_acc", "ood_acc", "ood_format", *(f"ood_{t}" for t in toy.PRIOR_TASKS)):
        assert 0.0 <= out[k] <= 1.0
    assert out["entropy"] > 0 and out["sample_entropy"] > 0
    assert ev(lm) == out  # evaluation is deterministic (sampling uses its own seed)


def test_arms_share_schedule_and_differ_only_where_stated():
    p = PRESETS["cpu"]
    psft, sft, paper = (arm_config(p, a) for a in ("psft", "sft", "sft_paper"))
    assert (psft.method, sft.method, paper.method) == ("psft", "sft", "sft")
    assert (sft.batch_size, sft.minibatch_size, sft.lr) == (psft.batch_size, psft.minibatch_size, psft.lr)
    assert psft.batch_size // psft.minibatch_size == 8  # as the official 256 / 32
    assert paper.minibatch_size == paper.batch_size and paper.lr > psft.lr


def test_ablation_settings():
    p = PRESETS["smoke"]
    refresh = {j.setting: j.config for j in ablation_jobs(p, "refresh")}
    assert [c.batch_size // c.minibatch_size for k, c in refresh.items() if k != "refresh never"] == [1, 4, 8, 16]
    assert refresh["refresh never"].refresh_pi_old is False
    eps = {j.setting: j.config.eps_high for j in ablation_jobs(p, "eps")}
    assert eps == {"eps_high 0.14": 0.14, "eps_high 0.28": 0.28, "eps_high 0.42": 0.42, "no clip": 1e9}
    warm = [j.config.sft_warmup_steps for j in ablation_jobs(p, "warmup")]
    assert warm[0] == 0 and warm[1] > 0
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_jobs(p, "lr")



def test_an_ablation_is_one_registry_entry(monkeypatch):
    from minipsft.lab.ablations import Ablation

    p = PRESETS["smoke"]
    for name in ABLATIONS:
        jobs = ablation_jobs(p, name)
        assert jobs and {j.group for j in jobs} == {name}
        assert len({j.name for j in jobs}) == len(jobs)  # one history file per run
    kl = Ablation(lambda p: [("sft_kl", f"kl {c}", dict(kl_coef=c)) for c in (0.1, 1.0)])
    monkeypatch.setitem(ABLATIONS, "kl", kl)
    jobs = ablation_jobs(p, "kl")
    assert [(j.setting, j.config.kl_coef) for j in jobs] == [("kl 0.1", 0.1), ("kl 1.0", 1.0)]

def test_reproduce_smoke_writes_results_and_figures(tmp_path, smoke_cache):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "minipsft", "reproduce", "--preset", "smoke", "--out", str(out),
                           "--cache", str(smoke_cache)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    records = data["records"]
    arms = {"psft", "sft", "sft_kl", "dft", "sft_paper", "sft_small"}
    assert {r["method"] for r in records} == arms
    for arm in arms:
        assert sorted(r["epoch"] for r in records if r["method"] == arm) == [0, 1, 2, 3, 4]
    for r in records:
        assert {"method", "seed", "epoch", "entropy", "id_acc", "ood_acc"} <= set(r)
    assert any(r["clipfrac"] for r in records if r["method"] == "psft")
    assert data["summary"]["clipped_tokens"]["seen"]["format"] > 0
    assert "level" in data["summary"]["matched_id"]
    for name in ("epoch_stability.png", "tradeoff.png"):
        assert (out / name).stat().st_size > 20_000
    assert len(list((out / "histories").glob("*.jsonl"))) == 6
    assert "| psft |" in (out / "report.md").read_text()


def test_the_cpu_base_ships_with_the_package_and_is_used_before_pretraining(tmp_path):
    cfg = toy.BaseConfig()
    lm, path, loaded = toy.pretrained_base(cfg, tmp_path / "empty_cache", progress=False)
    assert loaded and path == toy.SHIPPED_BASES / f"base-{cfg.key()}"
    assert json.loads((path / "base_config.json").read_text()) == asdict(cfg)
    assert sum(p.numel() for p in lm.model.parameters()) > 800_000
    assert not (tmp_path / "empty_cache").exists()  # nothing was pretrained or written


def test_the_quick_preset_is_the_cpu_world_smaller():
    quick, cpu = PRESETS["quick"], PRESETS["cpu"]
    assert quick.base == cpu.base and quick.n_train == cpu.n_train
    assert (quick.lr, quick.sft_paper_lr) == (cpu.lr, cpu.sft_paper_lr)
    assert set(quick.arms) == {"psft", "sft", "sft_paper"} and quick.epochs < cpu.epochs


def test_frontier_jobs_sweep_the_lrs_for_every_arm():
    from minipsft.lab.ablations import FRONTIER_LRS, FRONTIER_PAPER_LRS

    jobs = ablation_jobs(PRESETS["cpu"], "frontier")
    assert len(jobs) == (3 * len(FRONTIER_LRS) + len(FRONTIER_PAPER_LRS)) * 3
    lrs = {(j.arm, j.config.lr) for j in jobs}
    assert ("psft", 1e-4) in lrs and ("sft", 3e-3) in lrs and ("sft_paper", 2e-3) in lrs
    assert max(FRONTIER_LRS) / min(FRONTIER_LRS) >= 10
    paper = [j for j in jobs if j.arm == "sft_paper"]
    assert all(j.config.minibatch_size == j.config.batch_size for j in paper)


def test_frontier_gaps_at_fixed_levels_on_hand_made_records():
    """A synthetic frontier with a known gap: PSFT 0.1 above SFT at every ID it reaches, with seed
    noise; the gap is computed at each fixed level per seed, with a t interval, never maximised."""
    from minipsft.lab.reports import frontier_summary, frontier_value

    def rec(arm, lr, seed, epoch, id_acc, ood):
        return {"method": arm, "setting": f"{arm} lr={lr:g}", "seed": seed, "epoch": epoch,
                "id_acc": id_acc, "ood_acc": ood}

    records = []
    for seed, noise in ((0, 0.0), (1, 0.02), (2, -0.02)):
        for arm, bonus in (("psft", 0.1 + noise), ("sft", 0.0)):
            records += [rec(arm, 1e-4, seed, 1, 0.6, 0.5 + bonus),
                        rec(arm, 1e-4, seed, 2, 0.9, 0.3 + bonus),
                        rec(arm, 1e-3, seed, 1, 0.8, 0.35 + bonus)]
    points = {"psft": [(0.6, 0.6, 1e-4, 1), (0.9, 0.4, 1e-4, 2), (0.8, 0.45, 1e-3, 1)]}
    assert frontier_value(points["psft"], 0.7) == 0.45
    assert frontier_value(points["psft"], 0.95) is None
    gaps = frontier_summary(records, levels=(0.6, 0.7, 0.9, 0.95))["sft"]
    assert list(gaps) == ["0.60", "0.70", "0.90", "0.95"]
    for level in ("0.60", "0.70", "0.90"):
        assert gaps[level]["diff"] == pytest.approx(0.1) and gaps[level]["sign"] == "+"
        assert gaps[level]["lo"] == pytest.approx(0.1 - 4.302653 * 0.02 / 3 ** 0.5, rel=1e-4)
    assert gaps["0.95"] is None  # no seed's frontier reaches 0.95


def test_a_half_written_base_is_ignored_and_rebuilt(tmp_path):
    """A base folder without its completion mark (a pretraining killed while saving) is ignored,
    said so, and pretrained again into a complete folder."""
    from minipsft.lab import toy

    cfg = toy.BaseConfig(hidden=16, layers=1, heads=2, pretrain_rows=256, pretrain_batch=64)
    half = tmp_path / f"base-{cfg.key()}"
    half.mkdir()
    (half / "config.json").write_text("{}")  # what a kill mid-save leaves
    (half / "model.safetensors").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="no base_config.json"):
        lm, path, loaded = toy.pretrained_base(cfg, tmp_path, progress=False, shipped=False)
    assert not loaded and path == half and (half / "base_config.json").exists()
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary folder was renamed into place
    again, _, loaded = toy.pretrained_base(cfg, tmp_path, progress=False, shipped=False)
    assert loaded
    for p, q in zip(lm.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)
