"""`compute_policy_loss`: the one entry point trainers (and independent checks) call."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from megarl.errors import ConfigError
from megarl.losses.aggregation import aggregate_loss
from megarl.losses.batch import LossBatch, masked_mean
from megarl.losses.kl import KL_TYPES, kl_penalty
from megarl.losses.metrics import loss_metrics
from megarl.losses.registry import AGG_MODES, get_policy_loss, validate_loss_params


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
    seq_lengths: Tensor | None = None,
    norm_length: float | None = None,
    process_group: Any = None,
    compute_metrics: bool = True,
    **hyperparams: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy loss `name` on one (micro-)batch; returns ``(loss, metrics)``.

    Tensors are ``[batch, response_len]``; `advantages` may be ``[batch]`` (broadcast per
    token). `num_tokens` / `num_sequences` are the GLOBAL normalisers of the mini-batch (all
    micro-batches and data/context-parallel ranks); by default this batch's own counts. The
    returned loss is this batch's share: shares of a split batch sum to the whole batch's loss.

    `**hyperparams` are the loss's own (see ``POLICY_LOSSES[name].params``), validated.
    Optional KL to a reference policy: ``beta * KL_kind(pi || pi_ref)`` per token, aggregated
    like the policy term (GRPO's beta term). `entropy` (per token) is only reported.
    `seq_lengths` (global tokens per sequence) and `norm_length` (Dr. GRPO's constant) feed the
    aggregation; `process_group` is the data-parallel group for losses with batch statistics
    (BAPO's bound search).
    """
    spec = get_policy_loss(name)
    params = validate_loss_params(name, hyperparams, field="hyperparams")
    if agg not in AGG_MODES:
        raise ConfigError("agg", agg, f"must be one of {', '.join(AGG_MODES)}")
    if kl_type not in KL_TYPES:
        raise ConfigError("kl_type", kl_type, f"must be one of {', '.join(KL_TYPES)}")
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not beta >= 0:
        raise ConfigError("beta", beta, "must be a number >= 0")
    if beta and ref_log_prob is None:
        raise ConfigError("beta", beta, "a KL penalty needs ref_log_prob")
    if beta and ref_log_prob.shape != log_prob.shape:
        raise ValueError(f"ref_log_prob has shape {tuple(ref_log_prob.shape)}, "
                         f"log_prob {tuple(log_prob.shape)}")

    batch = LossBatch.prepare(log_prob, old_log_prob, advantages, response_mask, seq_lengths,
                              process_group)
    terms = spec.fn(batch, **params)
    policy_mat = torch.where(batch.mask, terms.loss_mat, torch.zeros_like(terms.loss_mat))

    def reduce(mat: Tensor) -> Tensor:
        return aggregate_loss(mat, batch.mask, agg, num_tokens=num_tokens,
                              num_sequences=num_sequences,
                              lengths=None if seq_lengths is None else batch.lengths,
                              norm_length=norm_length)

    policy_loss = reduce(policy_mat)
    loss = policy_loss
    metrics: dict[str, Tensor] = {"loss/policy": policy_loss.detach()}
    if beta:
        ref = torch.where(batch.mask, ref_log_prob.detach().to(batch.log_prob.dtype),
                          batch.log_prob.detach())  # padding: KL 0, never NaN
        kl_mat = torch.where(batch.mask, kl_penalty(batch.log_prob, ref, kl_type),
                             torch.zeros_like(batch.log_prob))
        kl_loss = reduce(kl_mat)
        loss = loss + beta * kl_loss
        metrics["loss/kl_ref"] = kl_loss.detach()
        metrics["kl/ref_mean"] = masked_mean(kl_mat.detach(), batch.mask)
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
                                entropy))
    metrics.update({k: torch.as_tensor(v).detach() for k, v in terms.metrics.items()})
    return loss, metrics
