"""The run's objective (`megarl.losses.Objective`): resolved and validated once, then called per
micro-batch with no lookup; the KL term and the entropy bonus live in it, aggregated like the
policy term."""

from __future__ import annotations

import pytest
import torch

import megarl.losses.objective as objective_module
import megarl.losses.registry as registry
from megarl.config import AlgoConfig
from megarl.errors import ConfigError
from megarl.losses import Objective, aggregate_loss, compute_policy_loss


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    log_prob = (-torch.rand(3, 5, generator=g) - 0.1).requires_grad_()
    old = log_prob.detach() + 0.05 * torch.randn(3, 5, generator=g)
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return log_prob, old, adv, mask


def test_a_resolved_objective_does_no_lookup_or_validation_per_call(monkeypatch):
    objective = Objective.resolve("up_gspo", {"eps_low": 0.1}, kl_beta=0.1, entropy_coef=0.01)

    def refuse(*args, **kwargs):
        raise AssertionError("looked up or validated on a micro-batch")

    for name in ("get_policy_loss", "validate_loss_params"):
        monkeypatch.setattr(objective_module, name, refuse)
        monkeypatch.setattr(registry, name, refuse)
    monkeypatch.setattr(registry.Hyper, "coerce", refuse)
    log_prob, old, adv, mask = batch()
    loss, metrics = objective(log_prob, old, adv, mask, ref_log_prob=old,
                              entropy=torch.rand(3, 5))
    assert torch.isfinite(loss) and "loss/kl_ref" in metrics and "loss/entropy_bonus" in metrics


def test_config_and_functional_form_resolve_to_the_same_objective():
    algo = AlgoConfig(loss="dapo", params={"eps_high": 0.3}, kl_beta=0.2, kl_type="k1",
                      entropy_coef=0.05)
    objective = algo.objective(norm_length=7)
    assert objective.name == "dapo" and objective.agg == "token-mean"
    assert objective.params["eps_high"] == 0.3 and objective.norm_length == 7
    log_prob, old, adv, mask = batch(1)
    entropy = torch.rand(3, 5)
    loss, _ = objective(log_prob, old, adv, mask, ref_log_prob=old, entropy=entropy)
    same, _ = compute_policy_loss("dapo", log_prob, old, adv, mask, "token-mean",
                                  ref_log_prob=old, beta=0.2, kl_type="k1", entropy=entropy,
                                  entropy_coef=0.05, eps_high=0.3, norm_length=7)
    assert torch.equal(loss, same)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_the_entropy_bonus_is_subtracted_and_aggregated_like_the_policy_term(agg):
    log_prob, old, adv, mask = batch(2)
    entropy = torch.rand(3, 5, requires_grad=True)
    plain = Objective.resolve("grpo", agg=agg, norm_length=9)
    bonus = Objective.resolve("grpo", agg=agg, entropy_coef=0.3, norm_length=9)
    base, _ = plain(log_prob, old, adv, mask, 40, 6, entropy=entropy)
    loss, metrics = bonus(log_prob, old, adv, mask, 40, 6, entropy=entropy)
    term = aggregate_loss(entropy, mask, agg, num_tokens=40, num_sequences=6, norm_length=9)
    torch.testing.assert_close(loss, base - 0.3 * term)
    torch.testing.assert_close(metrics["loss/entropy_bonus"], -0.3 * term.detach())
    assert metrics["loss/total"] == loss.detach()
    (grad,) = torch.autograd.grad(loss, entropy)
    (expected,) = torch.autograd.grad(-0.3 * term, entropy)
    torch.testing.assert_close(grad, expected)
    assert grad[1, 3:].abs().sum() == 0 and (grad[mask] < 0).all()
    (no_grad,) = torch.autograd.grad(base, entropy, allow_unused=True)
    assert no_grad is None  # without the bonus, entropy is only reported


@pytest.mark.parametrize("kwargs, field", [
    (dict(loss="nope"), "algo.loss"),
    (dict(params={"eps_lo": 0.1}), "algo.params.eps_lo"),
    (dict(agg="mean"), "algo.agg"),
    (dict(kl_beta=-1.0), "algo.kl_beta"),
    (dict(kl_type="k4"), "algo.kl_type"),
    (dict(entropy_coef=-0.1), "algo.entropy_coef"),
])
def test_every_part_is_validated_at_config_time_with_its_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        AlgoConfig(**kwargs).check()
    assert err.value.field == field
    assert "\n" not in str(err.value)
