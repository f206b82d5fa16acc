"""Aggregation of a per-token loss matrix into the scalar that is differentiated.

The normalisers are GLOBAL: ``num_tokens`` is the number of response tokens and
``num_sequences`` the number of sequences in the whole mini-batch (every micro-batch, every
data-parallel and context-parallel rank). The caller that knows them computes them once, before
the pipeline schedule, and passes them to every micro-batch's loss. Each micro-batch then returns
its share, and the shares SUM to the mini-batch loss — so splitting a batch into micro-batches
or across ranks changes neither the loss nor the gradient (tests/unit/test_aggregation.py).

Modes (L_i = tokens of sequence i, l_it = per-token loss, m_it = mask):
- ``token-mean``               sum_it m l / num_tokens                      (DAPO, token-level)
- ``seq-mean-token-mean``      sum_i (sum_t m l / L_i) / num_sequences      (GRPO paper, GSPO)
- ``seq-mean-token-sum``       sum_i (sum_t m l) / num_sequences            (BAPO's equations)
- ``seq-mean-token-sum-norm``  sum_it m l / (num_sequences * norm_length)  (Dr. GRPO: constant
  normaliser; norm_length is the maximum response length, a constant of the run)
"""

from __future__ import annotations

import torch
from torch import Tensor

from megarl.errors import ConfigError
from megarl.losses.registry import AGG_MODES


def count_tokens(response_mask: Tensor) -> int:
    """Number of valid tokens in this batch (the local default for `num_tokens`)."""
    return int(response_mask.bool().sum().item())


def count_sequences(response_mask: Tensor) -> int:
    """Number of sequences with at least one valid token (the local default for
    `num_sequences`)."""
    return int(response_mask.bool().any(-1).sum().item())


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    lengths: Tensor | None = None,
    norm_length: float | None = None,
) -> Tensor:
    """Reduce `loss_mat` ``[B, T]`` to this batch's share of the global loss.

    `lengths` ``[B]`` are the per-sequence token counts used by seq-mean-token-mean (defaults
    to this batch's mask; pass global lengths when a sequence is split across ranks).
    `norm_length` defaults to ``T``, which is only a constant if every micro-batch is padded to
    the same length: pass the run's maximum response length.
    """
    if mode not in AGG_MODES:
        raise ConfigError("algo.agg", mode, f"must be one of {', '.join(AGG_MODES)}")
    maskf = mask.to(loss_mat.dtype)
    masked = loss_mat * maskf
    if mode == "token-mean":
        n = count_tokens(mask) if num_tokens is None else num_tokens
        return masked.sum() / _at_least_one(n, loss_mat, "num_tokens")
    n_seq = count_sequences(mask) if num_sequences is None else num_sequences
    n_seq = _at_least_one(n_seq, loss_mat, "num_sequences")
    if mode == "seq-mean-token-mean":
        if lengths is None:
            lengths = maskf.sum(-1)
        per_seq = masked.sum(-1) / lengths.to(loss_mat.dtype).clamp(min=1.0)
        return per_seq.sum() / n_seq
    if mode == "seq-mean-token-sum":
        return masked.sum() / n_seq
    length = float(loss_mat.shape[-1]) if norm_length is None else float(norm_length)
    if length <= 0:
        raise ConfigError("norm_length", norm_length, "must be > 0")
    return masked.sum() / (n_seq * length)


def _at_least_one(n: float | Tensor, like: Tensor, field: str) -> Tensor:
    """A normaliser as a tensor, never below 1 (an empty batch contributes 0, not NaN)."""
    t = torch.as_tensor(n, dtype=like.dtype, device=like.device)
    if t.numel() != 1 or bool(t < 0) or not bool(torch.isfinite(t)):
        raise ConfigError(field, n, "must be a finite count >= 0 (the global normaliser)")
    return t.clamp(min=1.0)
