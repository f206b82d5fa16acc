"""The loss library's contract: registry, validation, purity (no Megatron / vLLM import)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from megarl.errors import ConfigError
from megarl.losses import AGG_MODES, POLICY_LOSSES, compute_policy_loss, validate_loss_params

SEED_LOSSES = {
    "grpo", "dapo", "gspo", "dr_grpo", "up_grpo", "up_dapo", "up_gspo", "dapo_eps_high_inf",
    "up_symmetric", "dgpo", "abc_grpo", "bapo", "cispo", "gppo", "ce_gppo", "sapo", "gmpo",
    "aspo", "dppo", "w_reinforce", "reinforce",
}


def test_every_loss_of_the_issue_is_registered_with_metadata():
    assert SEED_LOSSES <= set(POLICY_LOSSES)
    for spec in POLICY_LOSSES.values():
        assert spec.default_agg in AGG_MODES
        assert spec.summary and spec.fn.__doc__, spec.name
        validate_loss_params(spec.name, {})  # the defaults themselves are valid


def test_paper_defaults():
    assert validate_loss_params("dapo", {})["eps_high"] == 0.28
    assert validate_loss_params("up_gspo", {})["eps_low"] == 3e-4
    assert validate_loss_params("gspo", {}) == {"eps_low": 3e-4, "eps_high": 4e-4,
                                                "dual_clip_c": None}
    assert validate_loss_params("dgpo", {})["n"] == 1 and validate_loss_params("dgpo", {})["m"] == 2
    assert validate_loss_params("ce_gppo", {})["beta1"] == 0.75
    assert validate_loss_params("sapo", {}) == {"tau_pos": 1.0, "tau_neg": 1.05}
    assert validate_loss_params("gmpo", {})["eps_low"] == 0.4
    assert validate_loss_params("w_reinforce", {})["lam"] == 0.1
    assert math.isinf(validate_loss_params("dapo_eps_high_inf", {})["eps_high"])
    bapo = validate_loss_params("bapo", {})
    assert (bapo["rho0"], bapo["c_low_min"], bapo["c_low_max"], bapo["c_high_min"],
            bapo["c_high_max"], bapo["step_high"], bapo["step_low"]) == (0.4, 0.6, 0.9, 1.2,
                                                                        3.0, 0.05, 0.02)
    assert POLICY_LOSSES["dapo"].default_agg == "token-mean"
    assert POLICY_LOSSES["up_grpo"].default_agg == "seq-mean-token-mean"
    assert POLICY_LOSSES["dr_grpo"].default_agg == "seq-mean-token-sum-norm"


@pytest.mark.parametrize(("name", "params", "field", "allowed"), [
    ("grpo", {"eps_low": 1.0}, "algo.params.eps_low", "in [0, 1)"),
    ("grpo", {"eps_low": -0.1}, "algo.params.eps_low", "in [0, 1)"),
    ("grpo", {"eps_lo": 0.1}, "algo.params.eps_lo", "did you mean 'eps_low'"),
    ("grpo", {"eps_high": "wide"}, "algo.params.eps_high", "a number"),
    ("grpo", {"dual_clip_c": 0.5}, "algo.params.dual_clip_c", "> 1"),
    ("dgpo", {"n": 1.5}, "algo.params.n", "an integer"),
    ("dgpo", {"m": 0}, "algo.params.m", ">= 1"),
    ("dppo", {"variant": "topk"}, "algo.params.variant", "one of binary_tv, binary_kl"),
    ("dppo", {"delta_low": 1.5}, "algo.params.delta_low", "< 1"),
])
def test_bad_hyperparameters_are_one_line_errors(name, params, field, allowed):
    with pytest.raises(ConfigError) as err:
        validate_loss_params(name, params)
    message = str(err.value)
    assert message.startswith(field + "=") and allowed in message and "\n" not in message


def test_unknown_loss_and_agg():
    with pytest.raises(ConfigError, match=r"algo.loss='up_gpso'.*did you mean 'up_gspo'"):
        validate_loss_params("up_gpso", {})
    x = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match="agg='mean'"):
        compute_policy_loss("grpo", x, x, x, x, agg="mean")
    with pytest.raises(ConfigError, match="hyperparams.eps"):
        compute_policy_loss("grpo", x, x, x, x, eps=0.2)
    with pytest.raises(ConfigError, match="ref_log_prob"):
        compute_policy_loss("grpo", x, x, x, x, beta=0.1)


def test_yaml_strings_and_ints_are_coerced():
    assert math.isinf(validate_loss_params("dapo", {"eps_high": "inf"})["eps_high"])
    assert validate_loss_params("grpo", {"dual_clip_c": 3})["dual_clip_c"] == 3.0


def test_loss_library_imports_neither_megatron_nor_vllm():
    code = ("import sys, megarl.losses, megarl.advantages; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'vllm', "
            "'transformer_engine', 'apex')]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_loss_is_documented():
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "losses.md").read_text()
    missing = [name for name in POLICY_LOSSES if f"| `{name}` |" not in doc]
    assert not missing, f"docs/losses.md lacks a row for {missing}"


def test_loss_shares_reduce_to_the_mini_batch_loss():
    """megarl.metrics sums loss/* across micro-batches: the shares add up to the whole."""
    from megarl.metrics import MetricAccumulator

    g = torch.Generator().manual_seed(0)
    old = -torch.rand(8, 6, generator=g)
    lp = old + 0.3 * torch.randn(8, 6, generator=g)
    adv, mask = torch.randn(8, generator=g), torch.ones(8, 6, dtype=torch.bool)
    whole, _ = compute_policy_loss("dapo", lp, old, adv, mask)
    acc = MetricAccumulator()
    for sl in (slice(0, 3), slice(3, 8)):
        _, m = compute_policy_loss("dapo", lp[sl], old[sl], adv[sl], mask[sl], num_tokens=48)
        acc.add(m, weight=float(m["count/tokens"]))
    reduced = acc.reduce()
    assert reduced["loss/policy"] == pytest.approx(whole.item(), rel=1e-6)
    assert reduced["count/tokens"] == 48


def test_exact_bounds_never_halve_a_gradient():
    """A token exactly on a clip bound gets F = w or F = 0, never a tie-split w / 2."""
    w = torch.tensor([[0.8, 1.2, 0.8, 1.2, 1.1, 1.0 / 1.1]])
    lp, old = torch.log(w), torch.zeros_like(w)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones_like(w, dtype=torch.bool)
    for name, params in [("abc_grpo", {}), ("grpo", {}), ("dgpo", {}), ("ce_gppo", {}),
                         ("aspo", {"eps_low": 0.1, "eps_high": 0.1}), ("gppo", {})]:
        leaf = lp.clone().requires_grad_(True)
        compute_policy_loss(name, leaf, old, adv, mask, **params)[0].backward()
        f = (-leaf.grad * 6 / adv)[0]
        ratio = torch.exp(lp)[0]
        for fi, wi in zip(f.tolist(), ratio.tolist(), strict=True):
            assert fi != pytest.approx(wi / 2, rel=1e-4), (name, wi, fi)


def test_region_decisions_agree_with_region_metrics():
    """Soft-clip weights switch exactly where the reported regions say they do."""
    w = torch.full((1, 1000), 1.1).exp().log()  # ratios at (fp32) 1.1, the eps_high = 0.1 bound
    w = w * torch.linspace(0.999, 1.001, 1000)[None]
    lp, old, adv = torch.log(w), torch.zeros_like(w), torch.ones_like(w)
    leaf = lp.clone().requires_grad_(True)
    loss, m = compute_policy_loss("aspo", leaf, old, adv, torch.ones_like(w), eps_high=0.1)
    loss.backward()
    zero_grad = (leaf.grad == 0).float().mean().item()
    assert zero_grad == pytest.approx(m["region/HP"].item())


def test_kl_term_ignores_nan_padding_and_gmpo_regions_are_per_token():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    ref = torch.tensor([[-0.5, float("nan"), float("nan")]])
    mask = torch.tensor([[True, False, False]])
    loss, m = compute_policy_loss("grpo", lp, lp, torch.ones(1), mask, ref_log_prob=ref,
                                  beta=0.1)
    assert torch.isfinite(loss) and torch.isfinite(m["kl/ref_mean"])
    with pytest.raises(ConfigError, match="beta"):
        compute_policy_loss("grpo", lp, lp, torch.ones(1), mask, ref_log_prob=lp, beta=-1.0)
    # GMPO clips tokens: a token with w = 4 and A > 0 is in HP although its sequence is not
    w = torch.tensor([[4.0, 1.0, 1.0, 1.0]])
    _, m = compute_policy_loss("gmpo", torch.log(w), torch.zeros(1, 4), torch.ones(1),
                               torch.ones(1, 4), agg="seq-mean-token-mean")
    assert m["region/HP"].item() == pytest.approx(0.25)
    assert m["seq_ratio/max"].item() == pytest.approx(math.exp(0.4 / 4))


def test_shape_and_normaliser_errors_name_the_argument():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages has shape"):
        compute_policy_loss("grpo", x, x, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="num_tokens"):
        compute_policy_loss("grpo", x, x, torch.zeros(2), torch.ones(2, 3), num_tokens=-4)
