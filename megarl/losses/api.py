"""`compute_policy_loss`: the functional entry point (tests and independent checks call it).

A trainer resolves its `Objective` once and calls that per micro-batch; this function resolves
and calls in one go, validating its arguments every time.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from megarl.losses.objective import ARGUMENT_FIELDS, Objective
from megarl.losses.rollout_correction import RolloutCorrection


def compute_policy_loss(
    name: str,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    agg: str = "token-mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    *,
    ref_log_prob: Tensor | None = None,
    beta: float = 0.0,
    kl_type: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    rollout_log_prob: Tensor | None = None,
    rollout_correction: RolloutCorrection | None = None,
    seq_lengths: Tensor | None = None,
    norm_length: float | None = None,
    process_group: Any = None,
    compute_metrics: bool = True,
    **hyperparams: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy loss `name` on one (micro-)batch; returns ``(loss, metrics)``.

    ``Objective.resolve(name, hyperparams, agg=..., kl_beta=beta, ...)`` then a call of it:
    see `Objective.__call__` for the tensors and the global normalisers. `**hyperparams` are
    the loss's own (``POLICY_LOSSES[name].params``); ``beta`` weighs ``KL_kind(pi || pi_ref)``
    (GRPO's beta term) and ``entropy_coef`` the entropy bonus.
    """
    objective = Objective.resolve(name, hyperparams, agg=agg, kl_beta=beta, kl_type=kl_type,
                                  entropy_coef=entropy_coef, norm_length=norm_length,
                                  rollout_correction=rollout_correction, fields=ARGUMENT_FIELDS)
    return objective(log_prob, old_log_prob, advantages, response_mask, num_tokens,
                     num_sequences, ref_log_prob=ref_log_prob, entropy=entropy,
                     rollout_log_prob=rollout_log_prob,
                     seq_lengths=seq_lengths, process_group=process_group,
                     compute_metrics=compute_metrics)
