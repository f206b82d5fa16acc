"""Rollout correction (megarl/losses/rollout_correction.py): each mode's per-token weight against
its closed form, through the gradient of real losses; the identity when the engine's and the
trainer's log-probs agree; invariance to how the batch is split; the clip regions untouched;
one-line config errors; and a CPU training run whose engine log-probs are deliberately off."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarl.config import load_config
from megarl.errors import ConfigError
from megarl.losses import Objective, RolloutCorrection

ROOT = Path(__file__).resolve().parents[2]
MODES = ["token_tis", "token_mis", "token_mask", "seq_tis", "seq_mask", "geo_mask"]


def batch(seed: int = 0, spread: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 2 - 0.1
    log_prob = (old + 0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64))
    rollout = old + spread * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    return log_prob.requires_grad_(), old, rollout, adv, mask


def expected_weight(mode: str, old, rollout, mask, lower: float, upper: float):
    """The closed form, written out independently of the library."""
    d = torch.where(mask, old - rollout, torch.zeros_like(old))
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    seq, geo = d.sum(-1, keepdim=True).exp(), (d.sum(-1, keepdim=True) / n).exp()
    r = {"seq_tis": seq, "seq_mask": seq, "geo_mask": geo}.get(mode, d.exp()).expand_as(d)
    inside = (r >= lower) & (r <= upper)
    w = {"token_tis": r.clamp(max=upper), "seq_tis": r.clamp(max=upper),
         "token_mis": torch.where(inside, r, 0.0)}.get(mode, inside.to(r.dtype))
    return torch.where(mask, w, torch.zeros_like(w))


@pytest.mark.parametrize("loss", ["grpo", "up_gspo", "cispo"])
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_weights_the_gradient_by_its_closed_form(mode: str, loss: str) -> None:
    log_prob, old, rollout, adv, mask = batch()
    lower, upper = 0.6, 1.7
    rc = RolloutCorrection.resolve(mode, None if mode.endswith("tis") else lower, upper)
    plain = Objective.resolve(loss, agg="token-mean")
    corrected = Objective.resolve(loss, agg="token-mean", rollout_correction=rc)
    (g_plain,) = torch.autograd.grad(plain(log_prob, old, adv, mask)[0], log_prob)
    loss_value, metrics = corrected(log_prob, old, adv, mask, rollout_log_prob=rollout)
    (g_corr,) = torch.autograd.grad(loss_value, log_prob)
    w = expected_weight(mode, old, rollout, mask, lower if not mode.endswith("tis") else 0.0,
                        upper)
    torch.testing.assert_close(g_corr, w * g_plain)
    assert 0 < float(metrics["rollout_corr/cut_frac"]) < 1  # this batch has both kinds
    torch.testing.assert_close(metrics["rollout_corr/weight/mean"], w[mask].mean())


@pytest.mark.parametrize("mode", MODES)
def test_equal_log_probs_change_nothing(mode: str) -> None:
    log_prob, old, _, adv, mask = batch(1)
    rc = RolloutCorrection.resolve(mode)
    plain = Objective.resolve("up_gspo", agg="seq-mean-token-mean")
    corrected = Objective.resolve("up_gspo", agg="seq-mean-token-mean", rollout_correction=rc)
    a, _ = plain(log_prob, old, adv, mask)
    b, metrics = corrected(log_prob, old, adv, mask, rollout_log_prob=old.clone())
    assert torch.equal(a, b) and float(metrics["rollout_corr/cut_frac"]) == 0


@pytest.mark.parametrize("mode", MODES)
def test_splitting_the_batch_changes_nothing(mode: str) -> None:
    log_prob, old, rollout, adv, mask = batch(2)
    rc = RolloutCorrection.resolve(mode)
    objective = Objective.resolve("grpo", agg="seq-mean-token-mean", rollout_correction=rc)
    tokens, sequences = int(mask.sum()), int(mask.any(-1).sum())
    whole, _ = objective(log_prob, old, adv, mask, tokens, sequences, rollout_log_prob=rollout)
    parts = [objective(log_prob[s], old[s], adv[s], mask[s], tokens, sequences,
                       rollout_log_prob=rollout[s])[0] for s in (slice(0, 1), slice(1, 4))]
    torch.testing.assert_close(whole, sum(parts))


def test_the_clip_regions_are_the_losses_own() -> None:
    log_prob, old, rollout, adv, mask = batch(3, spread=2.0)
    rc = RolloutCorrection.resolve("token_mask", 0.9, 1.1)
    _, plain = Objective.resolve("dapo")(log_prob, old, adv, mask)
    _, corrected = Objective.resolve("dapo", rollout_correction=rc)(
        log_prob, old, adv, mask, rollout_log_prob=rollout)
    assert float(corrected["rollout_corr/cut_frac"]) > 0.5
    for key in [k for k in plain if k.startswith(("region/", "ratio/"))]:
        assert torch.equal(plain[key], corrected[key]), key


@pytest.mark.parametrize("override, field", [
    ("algo.rollout_correction.mode=tis", "algo.rollout_correction.mode"),
    ("algo.rollout_correction.mode=token_tis algo.rollout_correction.upper=1.0",
     "algo.rollout_correction.upper"),
    ("algo.rollout_correction.mode=seq_tis algo.rollout_correction.lower=0.5",
     "algo.rollout_correction.lower"),
    ("algo.rollout_correction.mode=geo_mask algo.rollout_correction.lower=1.2",
     "algo.rollout_correction.lower"),
    ("algo.rollout_correction.mode=token_tis algo.old_logprobs=rollout",
     "algo.rollout_correction.mode"),
])
def test_bad_settings_are_one_line_errors(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "examples" / "configs" / "quickstart.yaml", override.split())
    assert err.value.field == field and "\n" not in str(err.value)


# a megarl train whose engine reports log-probs at temperature 1.5 (its samples are drawn at 1)
SKEWED = """
import sys
from megarl.rollout import hf
generate = hf.HFEngine.generate
def skewed(self, *args, **kwargs):
    batch = generate(self, *args, **kwargs)
    for r in batch.rollouts:
        r.logprobs = r.logprobs * 1.5
    return batch
hf.HFEngine.generate = skewed
from megarl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(tmp: Path, skewed: bool) -> list[dict]:
    cmd = [sys.executable, "-c", SKEWED] if skewed else [sys.executable, "-m", "megarl"]
    r = subprocess.run([*cmd, "train", "examples/configs/quickstart.yaml", "trainer.steps=2",
                        "trainer.eval_every=0", "checkpoint.save_every=0", "logging.sinks=[jsonl]",
                        f"logging.dir={tmp}", "logging.run_name=r",
                        "algo.rollout_correction.mode=token_tis"],
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in (tmp / "r" / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_a_mismatched_engine_is_corrected(tmp_path: Path) -> None:
    matched, skewed = run(tmp_path / "matched", False), run(tmp_path / "skewed", True)
    for row in matched:  # fp32 on the CPU: the engine agrees with the trainer
        assert row["rollout_corr/cut_frac"] == 0
        assert math.isclose(row["rollout_corr/weight/mean"], 1.0, abs_tol=1e-4)
    for row in skewed:  # log pi_rollout = 1.5 log pi: ratios exp(-0.5 log pi) > 1, truncated
        assert row["rollout_corr/ratio/mean"] > 1.05
        assert row["rollout_corr/cut_frac"] > 0
        assert row["rollout_corr/weight/max"] <= 2.0  # C = 2, the token_tis default
        assert row["rollout_corr/weight/mean"] < row["rollout_corr/ratio/mean"]
        assert row["rollout/k3_kl"] > matched[0]["rollout/k3_kl"]
