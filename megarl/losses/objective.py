"""The objective of a run, resolved once: the policy loss, its aggregation, the KL term and the
entropy bonus in one object.

    L = L_policy  +  kl_beta * L_KL(pi || pi_ref)  -  entropy_coef * H(pi)

with a rollout correction (`megarl.losses.rollout_correction`) weighting each token's policy
term by a detached importance weight between the trainer's old policy and the engine's, and
every term aggregated the same way (``agg``, with the same global normalisers). `Objective.resolve`
looks the loss up and validates every parameter once, at config time; calling the resolved
object on a micro-batch does no lookup and no validation. ``compute_policy_loss`` (the
functional entry point) resolves and calls in one go.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from megarl.errors import ConfigError
from megarl.losses.aggregation import aggregate_loss
from megarl.losses.batch import LossBatch, masked_mean
from megarl.losses.kl import KL_TYPES, kl_penalty
from megarl.losses.metrics import loss_metrics
from megarl.losses.registry import AGG_MODES, PolicyLossSpec, get_policy_loss, validate_loss_params
from megarl.losses.rollout_correction import RolloutCorrection


@dataclass(frozen=True)
class ObjectiveFields:
    """The names errors give each input: config fields, or a function's arguments."""

    loss: str = "algo.loss"
    params: str = "algo.params"
    agg: str = "algo.agg"
    kl_beta: str = "algo.kl_beta"
    kl_type: str = "algo.kl_type"
    entropy_coef: str = "algo.entropy_coef"


CONFIG_FIELDS = ObjectiveFields()
ARGUMENT_FIELDS = ObjectiveFields("name", "hyperparams", "agg", "beta", "kl_type", "entropy_coef")


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(name, value, "must be a number >= 0")
    return float(value)


@dataclass(frozen=True)
class Objective:
    """A registered policy loss with validated hyperparameters, aggregation and extra terms."""

    spec: PolicyLossSpec
    agg: str
    params: Mapping[str, Any] = field(default_factory=dict)
    kl_beta: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    norm_length: float | None = None  # Dr. GRPO's constant (the max response length)
    rollout_correction: RolloutCorrection | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def resolve(
        cls,
        loss: str,
        params: Mapping[str, Any] | None = None,
        *,
        agg: str | None = None,
        kl_beta: float = 0.0,
        kl_type: str = "k3",
        entropy_coef: float = 0.0,
        norm_length: float | None = None,
        rollout_correction: RolloutCorrection | None = None,
        fields: ObjectiveFields = CONFIG_FIELDS,
    ) -> Objective:
        """Look `loss` up and validate everything; ``agg=None`` is the loss's own default.

        Raises a one-line ConfigError naming the field (``fields``) for any bad input.
        """
        spec = get_policy_loss(loss, fields.loss)
        resolved = validate_loss_params(loss, params, fields.params)
        if agg is not None and agg not in AGG_MODES:
            raise ConfigError(fields.agg, agg,
                              f"must be null (the loss's default) or one of {', '.join(AGG_MODES)}")
        if kl_type not in KL_TYPES:
            raise ConfigError(fields.kl_type, kl_type, f"must be one of {', '.join(KL_TYPES)}")
        if norm_length is not None and not norm_length > 0:
            raise ConfigError("norm_length", norm_length, "must be > 0")
        return cls(spec, spec.default_agg if agg is None else agg, resolved,
                   _non_negative(fields.kl_beta, kl_beta), kl_type,
                   _non_negative(fields.entropy_coef, entropy_coef), norm_length,
                   rollout_correction)

    def __call__(
        self,
        log_prob: Tensor,
        old_log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        num_tokens: float | Tensor | None = None,
        num_sequences: float | Tensor | None = None,
        *,
        ref_log_prob: Tensor | None = None,
        entropy: Tensor | None = None,
        rollout_log_prob: Tensor | None = None,
        seq_lengths: Tensor | None = None,
        process_group: Any = None,
        compute_metrics: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """This (micro-)batch's share of L; returns ``(loss, metrics)``.

        Tensors are ``[batch, response_len]``; `advantages` may be ``[batch]``. `num_tokens` /
        `num_sequences` are the GLOBAL normalisers of the mini-batch (default: this batch's
        own counts), so the shares of a split batch sum to the whole batch's loss. `entropy`
        (per token) is reported, and with ``entropy_coef > 0`` its gradient flows into the
        bonus. `rollout_log_prob` (the engine's log-probs) feeds the rollout correction.
        `seq_lengths` are global tokens per sequence; `process_group` is the
        data-parallel group of losses with batch statistics (BAPO's bound search).
        """
        if self.kl_beta and ref_log_prob is None:
            raise ConfigError("ref_log_prob", None, "a KL penalty (kl_beta > 0) needs it")
        if self.kl_beta and ref_log_prob.shape != log_prob.shape:
            raise ValueError(f"ref_log_prob has shape {tuple(ref_log_prob.shape)}, "
                             f"log_prob {tuple(log_prob.shape)}")
        batch = LossBatch.prepare(log_prob, old_log_prob, advantages, response_mask, seq_lengths,
                                  process_group)
        terms = self.spec.fn(batch, **self.params)
        policy_mat = torch.where(batch.mask, terms.loss_mat, torch.zeros_like(terms.loss_mat))
        correction_metrics: dict[str, Tensor] = {}
        if self.rollout_correction is not None:
            if rollout_log_prob is None:
                raise ConfigError("rollout_log_prob", None,
                                  "a rollout correction needs the engine's log-probs")
            weight, correction_metrics = self.rollout_correction.weights(
                batch.old_log_prob, rollout_log_prob, batch.mask, batch.lengths)
            policy_mat = policy_mat * weight.to(policy_mat.dtype)

        def reduce(mat: Tensor) -> Tensor:
            return aggregate_loss(mat, batch.mask, self.agg, num_tokens=num_tokens,
                                  num_sequences=num_sequences,
                                  lengths=None if seq_lengths is None else batch.lengths,
                                  norm_length=self.norm_length)

        policy_loss = reduce(policy_mat)
        loss = policy_loss
        metrics: dict[str, Tensor] = {"loss/policy": policy_loss.detach()}
        if self.kl_beta:
            ref = torch.where(batch.mask, ref_log_prob.detach().to(batch.log_prob.dtype),
                              batch.log_prob.detach())  # padding: KL 0, never NaN
            kl_mat = torch.where(batch.mask, kl_penalty(batch.log_prob, ref, self.kl_type),
                                 torch.zeros_like(batch.log_prob))
            kl_loss = reduce(kl_mat)
            loss = loss + self.kl_beta * kl_loss
            metrics["loss/kl_ref"] = kl_loss.detach()
            metrics["kl/ref_mean"] = masked_mean(kl_mat.detach(), batch.mask)
        if self.entropy_coef and entropy is not None:
            entropy_term = reduce(entropy)
            loss = loss - self.entropy_coef * entropy_term
            metrics["loss/entropy_bonus"] = -self.entropy_coef * entropy_term.detach()
        metrics["loss/total"] = loss.detach()
        if not compute_metrics:
            return loss, metrics

        grad = None
        if batch.log_prob.requires_grad:
            (grad,) = torch.autograd.grad(policy_mat.sum(), batch.log_prob, retain_graph=True,
                                          allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(batch.log_prob)
        metrics.update(loss_metrics(batch, terms.ratio, terms.bounds, grad, terms.sequence_ratio,
                                    None if entropy is None else entropy.detach()))
        metrics.update({k: torch.as_tensor(v).detach() for k, v in terms.metrics.items()})
        metrics.update(correction_metrics)
        return loss, metrics
