"""The normalisation contract: with GLOBAL normalisers, the shares of a batch split into
micro-batches sum to the whole batch's loss, and their gradients to its gradient (1e-6)."""

from __future__ import annotations

import pytest
import torch

from megarl.losses import AGG_MODES, POLICY_LOSSES, aggregate_loss, compute_policy_loss

B, T = 12, 16
# BAPO searches its bounds on the batch it sees; with fixed bounds it is split-invariant.
FIXED = {"bapo": {"c_low": 0.7, "c_high": 1.4}}


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[3] = False  # an empty sequence must count for nothing
    old = -10 * torch.rand(B, T, generator=g, dtype=torch.float64)
    lp = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return lp, old, adv, mask


def run(name, lp, old, adv, mask, agg, **kw):
    leaf = lp.clone().requires_grad_(True)
    loss, _ = compute_policy_loss(name, leaf, old, adv, mask, agg=agg, **FIXED.get(name, {}),
                                  **kw)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("splits", [[12], [6, 6], [5, 4, 3], [1] * 12])
def test_micro_batch_split_invariance(name, agg, splits):
    lp, old, adv, mask = batch()
    n_tok, n_seq = int(mask.sum()), int(mask.any(-1).sum())
    norm = {"norm_length": 16.0}
    whole, g_whole = run(name, lp, old, adv, mask, agg, num_tokens=n_tok, num_sequences=n_seq,
                         **norm)
    total, grads, start = torch.zeros((), dtype=torch.float64), [], 0
    for size in splits:
        sl = slice(start, start + size)
        # each micro-batch is trimmed to its own longest sequence: padding differs per split
        width = max(int(mask[sl].sum(-1).max()), 1)
        share, g = run(name, lp[sl, :width], old[sl, :width], adv[sl], mask[sl, :width], agg,
                       num_tokens=n_tok, num_sequences=n_seq, **norm)
        total += share
        grads.append(torch.nn.functional.pad(g, (0, T - width)))
        start += size
    torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.cat(grads), g_whole, rtol=1e-6, atol=1e-9)


def test_default_normalisers_are_local_counts():
    lp, old, adv, mask = batch(1)
    loss_default, _ = run("grpo", lp, old, adv, mask, "token-mean")
    loss_explicit, _ = run("grpo", lp, old, adv, mask, "token-mean", num_tokens=int(mask.sum()))
    torch.testing.assert_close(loss_default, loss_explicit)
    loss_seq, _ = run("grpo", lp, old, adv, mask, "seq-mean-token-sum")
    loss_seq2, _ = run("grpo", lp, old, adv, mask, "seq-mean-token-sum", num_sequences=11)
    torch.testing.assert_close(loss_seq, loss_seq2)  # 11 non-empty sequences of 12


def test_aggregation_modes_by_hand():
    # two sequences: losses (1, 2, pad) and (3, pad, pad); lengths 2 and 1
    mat = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert aggregate_loss(mat, mask, "token-mean").item() == pytest.approx(6 / 3)
    # (1+2)/2 = 1.5 and 3/1 = 3 -> mean 2.25
    assert aggregate_loss(mat, mask, "seq-mean-token-mean").item() == pytest.approx(2.25)
    assert aggregate_loss(mat, mask, "seq-mean-token-sum").item() == pytest.approx(6 / 2)
    # Dr. GRPO: sum 6 over (2 sequences x constant 4)
    assert aggregate_loss(mat, mask, "seq-mean-token-sum-norm",
                          norm_length=4).item() == pytest.approx(6 / 8)
    # global normalisers override the local counts: this batch's share of a bigger one
    assert aggregate_loss(mat, mask, "token-mean", num_tokens=12).item() == pytest.approx(0.5)


def test_nan_in_padding_never_leaks():
    lp, old, adv, mask = batch(2)
    lp, old = lp.clone(), old.clone()
    lp[~mask], old[~mask] = float("nan"), float("-inf")
    for name in sorted(POLICY_LOSSES):
        loss, grad = run(name, lp, old, adv, mask, "token-mean")
        assert torch.isfinite(loss), name
        assert torch.isfinite(grad).all() and (grad[~mask] == 0).all(), name
