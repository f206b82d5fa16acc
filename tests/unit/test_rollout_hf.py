"""The transformers rollout engine honours the engine contract (megarl/rollout/engine.py)."""

from __future__ import annotations

import pytest
import torch

from megarl.rollout.engine import RolloutEngine, SamplingParams
from megarl.rollout.hf import HFEngine

TINY_MOE = {
    "model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
    "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2,
    "norm_topk_prob": True, "max_position_embeddings": 64, "tie_word_embeddings": False,
    "initializer_range": 0.5, "mlp_only_layers": [1], "eos_token_id": 95,
}  # fmt: skip


def tiny_model(**overrides):
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**{**TINY_MOE, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    return HFEngine(tiny_model(), device="cpu")


PROMPTS = [[5, 9, 11], [7], [3, 4, 5, 6, 8, 10, 12]]


def full_forward(model, tokens: torch.Tensor):
    """Router top-k of every layer and the logits, from one un-cached forward."""
    captured = []
    hooks = [m.register_forward_hook(lambda mod, a, out: captured.append(out[2]))
             for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    with torch.no_grad():
        logits = model(tokens[None]).logits[0]
    for h in hooks:
        h.remove()
    return torch.stack(captured, dim=1), logits


def test_is_a_rollout_engine(engine: HFEngine) -> None:
    assert isinstance(engine, RolloutEngine)
    assert len(engine.routers) == 2  # layer 1 is dense (mlp_only_layers)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_and_routes_match_a_full_forward(engine: HFEngine, temperature: float) -> None:
    batch = engine.generate(PROMPTS, SamplingParams(temperature=temperature, max_tokens=6,
                                                    seed=3, ignore_eos=True))
    for prompt, r in zip(PROMPTS, batch.rollouts, strict=True):
        assert r.prompt_ids.tolist() == prompt and len(r.response_ids) == 6
        assert r.finish_reason == "length"
        tokens = r.token_ids
        routes, logits = full_forward(engine.model, tokens)
        assert r.routed_experts.dtype == torch.uint8
        assert r.routed_experts.shape == (len(tokens) - 1, 2, 2)  # fed tokens x MoE layers x k
        # the same expert SETS as an un-cached forward over the whole sequence
        assert torch.equal(r.routed_experts.long().sort(-1).values,
                           routes[:-1].sort(-1).values)
        expected = torch.log_softmax(logits[len(prompt) - 1:-1] / temperature, -1)
        expected = expected.gather(-1, r.response_ids[:, None])[:, 0]
        # float32: a KV-cached decode and one full forward sum in different orders
        torch.testing.assert_close(r.logprobs, expected, atol=1e-5, rtol=1e-5)


def test_stop_tokens_top_k_and_top_p(engine: HFEngine) -> None:
    batch = engine.generate(PROMPTS * 4, SamplingParams(max_tokens=12, seed=1, top_k=1))
    for r in batch.rollouts:  # greedy: the response is the argmax chain
        _, logits = full_forward(engine.model, r.token_ids)
        p = len(r.prompt_ids)
        assert torch.equal(logits[p - 1:-1].argmax(-1), r.response_ids)
    # stop token: the sample ends at it and says so
    first = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=1, seed=0, top_k=1))
    stop = int(first.rollouts[0].response_ids[0])
    r = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=5, seed=0, top_k=1,
                                                     stop_token_ids=(stop,))).rollouts[0]
    assert r.response_ids.tolist() == [stop] and r.finish_reason == "stop"
    assert r.routed_experts.shape[0] == len(PROMPTS[0])  # P + 1 - 1
    # top-p: only tokens inside the nucleus are ever sampled
    many = engine.generate([PROMPTS[1]] * 64, SamplingParams(max_tokens=1, seed=5, top_p=0.3))
    _, logits = full_forward(engine.model, torch.tensor(PROMPTS[1]))
    probs, order = logits[-1].softmax(-1).sort(descending=True)
    nucleus = set(order[: int((probs.cumsum(0) < 0.3).sum()) + 1].tolist())
    assert {int(r.response_ids[0]) for r in many.rollouts} <= nucleus


def test_update_weights_round_trip_and_unknown_name(engine: HFEngine) -> None:
    other = HFEngine(tiny_model(initializer_range=0.2), device="cpu")
    pairs = list(other.hf_tensors())
    assert any(".experts.3.up_proj.weight" in n for n, _ in pairs)
    clone = HFEngine(tiny_model(), device="cpu")
    loaded = clone.update_weights(pairs)
    assert loaded == sum(t.numel() * t.element_size() for _, t in pairs)
    for (name, a), (_, b) in zip(clone.hf_tensors(), other.hf_tensors(), strict=True):
        assert torch.equal(a, b), name
    from megarl.errors import UserError

    with pytest.raises(UserError, match="no tensor model.layers.0.mlp.experts.9.up.weight"):
        clone.update_weights([("model.layers.0.mlp.experts.9.up.weight", torch.zeros(1))])
    with pytest.raises(UserError, match="model.norm.weight has shape"):
        clone.update_weights([("model.norm.weight", torch.zeros(3))])


def test_temperature_zero_is_greedy_whatever_the_seed(engine: HFEngine) -> None:
    """Evaluation's greedy decode (``eval.greedy``): the argmax chain of a full forward, the
    same for every seed, with log-probs at temperature 1."""
    runs = [engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, seed=s,
                                                    ignore_eos=True)) for s in (0, 7)]
    for a, b in zip(*(r.rollouts for r in runs), strict=True):
        assert torch.equal(a.response_ids, b.response_ids)
        _, logits = full_forward(engine.model, a.token_ids)
        p = len(a.prompt_ids)
        assert torch.equal(logits[p - 1:-1].argmax(-1), a.response_ids)
        expected = torch.log_softmax(logits[p - 1:-1], -1).gather(-1, a.response_ids[:, None])
        torch.testing.assert_close(a.logprobs, expected[:, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="rollout.temperature"):
        SamplingParams(temperature=-1.0).check()


def test_large_calls_decode_in_chunks_with_the_same_results(engine: HFEngine) -> None:
    """`max_batch` bounds the rows decoded together (memory); greedy answers do not depend on
    it and a seeded call repeats itself."""
    prompts = PROMPTS * 3
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    whole = engine.generate(prompts, greedy).rollouts
    small = HFEngine(engine.model, device="cpu", max_batch=2)
    chunked = small.generate(prompts, greedy).rollouts
    assert [r.response_ids.tolist() for r in chunked] == [r.response_ids.tolist() for r in whole]
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a.routed_experts.long().sort(-1).values,
                                   b.routed_experts.long().sort(-1).values)
    sampled = SamplingParams(max_tokens=4, seed=11, ignore_eos=True)
    first, again = (small.generate(prompts, sampled).rollouts for _ in range(2))
    assert [r.response_ids.tolist() for r in first] == [r.response_ids.tolist() for r in again]
