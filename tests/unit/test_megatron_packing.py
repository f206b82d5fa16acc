"""THD packing: label alignment, padding, budgets, unpacking, CP partition, block mask."""

from __future__ import annotations

import pytest
import torch

from megarl.megatron.packing import (
    ROLLOUT_LOGPROBS,
    TrainSample,
    block_causal_mask,
    cp_partition_index,
    make_micro_batches,
    pack_samples,
    segment_ids,
)


def sample(n: int, prompt: int = 2, adv: float = 1.0, seed: int = 0) -> TrainSample:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[prompt:] = True
    return TrainSample(
        tokens=torch.randint(1, 100, (n,), generator=g),
        loss_mask=mask,
        advantages=torch.tensor(adv),
        old_logprobs=-torch.rand(n, generator=g),
    )


def test_pack_is_label_aligned_per_sample() -> None:
    a, b = sample(5, seed=1), sample(4, prompt=1, adv=-2.0, seed=2)
    mb = pack_samples([a, b])
    assert mb.cu_seqlens.tolist() == [0, 5, 9]
    assert mb.sample_starts == [0, 5] and mb.sample_lengths == [5, 4]
    # row j predicts labels[j] = tokens[j + 1] inside a sample; a sample's last slot predicts 0
    assert mb.labels[:5].tolist() == [*a.tokens[1:].tolist(), 0]
    assert mb.labels[5:].tolist() == [*b.tokens[1:].tolist(), 0]
    assert mb.loss_mask.tolist() == [False, True, True, True, False, True, True, True, False]
    assert mb.old_logprobs[:4].tolist() == a.old_logprobs[1:].tolist()
    assert mb.advantages[5:8].tolist() == [-2.0] * 3
    assert mb.num_tokens == 3 + 3 and mb.num_sequences == 2


def test_engine_log_probs_travel_label_aligned_and_padded() -> None:
    import dataclasses

    a, b = sample(5, seed=1), sample(3, prompt=1, seed=2)
    a = dataclasses.replace(a, rollout_logprobs=a.old_logprobs - 0.5)
    b = dataclasses.replace(b, rollout_logprobs=b.old_logprobs - 0.25)
    mb = pack_samples([a, b], seq_multiple=4, row_multiple=16)
    row = mb.extras[ROLLOUT_LOGPROBS]
    assert row.shape == (16,) and mb.row_length == 16
    assert row[:4].tolist() == a.rollout_logprobs[1:].tolist()
    assert row[8:10].tolist() == b.rollout_logprobs[1:].tolist()
    assert row[12:].abs().sum() == 0  # the tail segment
    assert torch.equal(mb.to("cpu").extras[ROLLOUT_LOGPROBS], row)
    with pytest.raises(ValueError, match="rollout_logprobs: give it for every sample or none"):
        pack_samples([a, sample(4)])


def test_padding_per_sample_and_row_never_trains() -> None:
    mb = pack_samples([sample(5), sample(3, prompt=1)], seq_multiple=4, row_multiple=6)
    assert mb.cu_seqlens.tolist() == [0, 8, 12]
    assert mb.row_length == 12  # 12 is already a multiple of 6: no tail segment
    mb = pack_samples([sample(5), sample(3, prompt=1)], seq_multiple=4, row_multiple=8)
    assert mb.cu_seqlens.tolist() == [0, 8, 12, 16] and mb.row_length == 16
    assert not mb.loss_mask[5:8].any() and not mb.loss_mask[11:].any()
    assert mb.num_tokens == 3 + 2


def test_unpack_left_aligns_and_backpropagates() -> None:
    mb = pack_samples([sample(5), sample(3, prompt=1)], seq_multiple=4)
    row = torch.arange(mb.row_length, dtype=torch.float32, requires_grad=True)
    mat = mb.unpack(row)
    assert mat.tolist() == [[0, 1, 2, 3, 4], [8, 9, 10, 0, 0]]
    mat.sum().backward()
    assert row.grad.tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0]


def test_token_budget_and_fixed_count_split() -> None:
    samples = [sample(n, seed=n) for n in (6, 3, 4, 8, 2)]
    mbs = make_micro_batches(samples, max_tokens=10)  # first-fit decreasing
    assert [mb.sample_lengths for mb in mbs] == [[8, 2], [6, 4], [3]]
    assert all(mb.row_length <= 10 for mb in mbs)
    assert [len(mb.sample_lengths) for mb in make_micro_batches(samples, num_micro_batches=2)] \
        == [2, 3]
    # a sample over the budget gets a row of its own
    assert [mb.sample_lengths for mb in make_micro_batches(samples, max_tokens=5)] == \
        [[8], [6], [4], [3, 2]]


def test_cp_partition_is_zigzag_and_covers_every_position() -> None:
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    assert cp_partition_index(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert cp_partition_index(cu, 2, 1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    both = torch.cat([cp_partition_index(cu, 2, r) for r in range(2)])
    assert sorted(both.tolist()) == list(range(16))
    with pytest.raises(ValueError, match="2\\*cp=4"):
        cp_partition_index(torch.tensor([0, 6], dtype=torch.int32), 2, 0)


def test_block_causal_mask_isolates_samples() -> None:
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    assert segment_ids(cu, 5).tolist() == [0, 0, 0, 1, 1]
    allowed = ~block_causal_mask(cu, 5)[0, 0]
    assert allowed.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: pack_samples([]), "samples must not be empty"),
        (lambda: pack_samples([TrainSample(torch.tensor([1]), torch.tensor([False]),
                                           torch.tensor(1.0))]), "samples\\[0\\].tokens"),
        (lambda: pack_samples([TrainSample(torch.tensor([1, 2]), torch.tensor([True, True]),
                                           torch.tensor(1.0))]), "loss_mask\\[0\\] must be 0"),
        (lambda: pack_samples([TrainSample(torch.tensor([1, 2, 3]), torch.tensor([0, 1]).bool(),
                                           torch.tensor(1.0))]), "samples\\[0\\].loss_mask"),
        (lambda: make_micro_batches([sample(4)], num_micro_batches=2), "num_micro_batches=2"),
        (lambda: make_micro_batches([sample(4)], max_tokens=4, num_micro_batches=1),
         "exactly one"),
    ],
)
def test_bad_input_is_one_line(build, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        build()
    assert "\n" not in str(info.value)
