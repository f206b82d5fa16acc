"""The vLLM engine without vLLM: lazy import, arguments, sampling, outputs, routes, refit order.

vLLM needs a GPU, so `vllm.LLM` itself is replaced by `FakeLLM`, which answers with vLLM 0.33's
output structure (``RequestOutput.prompt_token_ids``, ``CompletionOutput.token_ids /
logprobs [{token: Logprob}] / finish_reason / routed_experts [P+R-1, num_hidden_layers, k]
uint8``) and records the calls the engine makes.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megarl.errors import ConfigError, UserError
from megarl.rollout.engine import RolloutEngine, SamplingParams
from megarl.rollout.vllm import (
    VLLMEngine,
    VLLMOptions,
    aligned_routes,
    check_launch_environment,
    engine_group,
    import_vllm,
    llm_kwargs,
    rollout_from_output,
    sampling_kwargs,
)

# Keyword names of vllm.LLM / EngineArgs in vLLM 0.33.0 that megarl sets (entrypoints/llm.py
# and engine/arg_utils.py of the 0.33.0 wheel): a renamed argument upstream shows up here.
VLLM_033_ARGS = {
    "model", "tensor_parallel_size", "distributed_executor_backend", "dtype", "seed",
    "gpu_memory_utilization", "enforce_eager", "enable_sleep_mode", "enable_prefix_caching",
    "enable_return_routed_experts", "moe_backend", "logprobs_mode", "max_logprobs",
    "load_format", "disable_custom_all_reduce", "max_model_len",
}
VLLM_033_SAMPLING = {"n", "temperature", "top_p", "top_k", "max_tokens", "stop_token_ids",
                     "ignore_eos", "seed", "logprobs", "detokenize"}

MOE = (False, True, True)  # layer 0 dense (mlp_only_layers), layers 1-2 MoE
EXPERTS, TOPK = 8, 2


def test_imports_without_vllm_and_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(UserError, match=r"pip install 'megarl\[vllm\]'"):
        import_vllm()
    with pytest.raises(UserError, match=r"megarl\[vllm\]"):
        VLLMEngine("/some/model", VLLMOptions(), moe_layers=MOE, num_experts=EXPERTS)


def test_llm_kwargs_colocated_r3_sleep_refit() -> None:
    kw = llm_kwargs("/m", VLLMOptions(tp=2, seed=10, max_model_len=4096), rank=5, world_size=8)
    assert set(kw) <= VLLM_033_ARGS
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["tensor_parallel_size"] == 2
    assert kw["enable_return_routed_experts"] is True
    assert kw["enable_sleep_mode"] is True
    assert kw["enable_prefix_caching"] is True  # vLLM 0.33 captures routes only with it on
    assert kw["moe_backend"] == "triton"
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["load_format"] == "dummy"
    assert kw["max_model_len"] == 4096
    assert kw["seed"] == 10 + 2  # rank 5 is in engine group 2 of 4
    seeds = [llm_kwargs("/m", VLLMOptions(tp=2), rank=r, world_size=8)["seed"]
             for r in range(8)]
    assert seeds == [0, 0, 1, 1, 2, 2, 3, 3]  # one seed per engine, shared by its TP ranks
    assert "max_model_len" not in llm_kwargs("/m", VLLMOptions(), rank=0, world_size=1)
    off = llm_kwargs("/m", VLLMOptions(routed_experts=False), rank=0, world_size=1)
    assert off["enable_return_routed_experts"] is False


def test_options_from_a_run_config() -> None:
    from pathlib import Path

    from megarl.config import load_config

    quickstart = Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml"
    c = load_config(quickstart, ["rollout.engine=vllm", "rollout.tp=2", "parallel.world_size=4",
                                 "rollout.moe_backend=batched_triton", "model.dtype=bfloat16"])
    opts = VLLMOptions.from_config(c, seed=3)
    assert (opts.tp, opts.moe_backend, opts.dtype, opts.seed) == (2, "batched_triton",
                                                                  "bfloat16", 3)
    assert opts.max_model_len == c.rollout.max_prompt_len + c.rollout.max_response_len
    assert opts.routed_experts  # MoE default: R3
    for mode in ("r2", "off"):
        c2 = load_config(quickstart, [f"model.routing_replay={mode}"])
        assert not VLLMOptions.from_config(c2, seed=0).routed_experts  # no routes to capture


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"rollout.tp=3: must divide the world size 8"):
        llm_kwargs("/m", VLLMOptions(tp=3), rank=0, world_size=8)
    with pytest.raises(ConfigError, match="rollout.moe_backend"):
        llm_kwargs("/m", VLLMOptions(moe_backend="cutlass"), rank=0, world_size=1)
    with pytest.raises(ConfigError, match="rollout.gpu_memory_utilization"):
        llm_kwargs("/m", VLLMOptions(gpu_memory_utilization=0.0), rank=0, world_size=1)
    assert engine_group(7, 8, 4) == (1, 2)


def test_launch_environment_is_checked() -> None:
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    check_launch_environment(env)
    with pytest.raises(UserError, match="torchrun or srun .*LOCAL_RANK"):
        check_launch_environment({"RANK": "0", "WORLD_SIZE": "1"})
    with pytest.raises(UserError, match="expandable_segments"):
        check_launch_environment(env | {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    with pytest.raises(UserError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        check_launch_environment(env | {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})


def test_sampling_kwargs() -> None:
    kw = sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.9, top_k=-1, max_tokens=32,
                                        stop_token_ids=(2, 5), seed=3))
    assert set(kw) == VLLM_033_SAMPLING
    assert kw["top_k"] == 0  # vLLM 0.33: 0 disables top-k
    assert kw["stop_token_ids"] == [2, 5] and kw["logprobs"] == 0 and kw["n"] == 1
    assert kw["detokenize"] is False and kw["temperature"] == 0.7 and kw["seed"] == 3
    assert sampling_kwargs(SamplingParams(top_k=20))["top_k"] == 20
    with pytest.raises(ConfigError, match="rollout.temperature"):
        sampling_kwargs(SamplingParams(temperature=0.0))


def _routes(rows: int, layers: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return np.stack([np.stack([g.permutation(EXPERTS)[:TOPK] for _ in range(layers)])
                     for _ in range(rows)]).astype(np.uint8)


def test_aligned_routes_select_moe_layers_and_check_rows() -> None:
    every = _routes(6, len(MOE))  # 7 tokens -> 6 rows, every hidden layer
    got = aligned_routes(every, 7, MOE, EXPERTS)
    assert got.dtype == torch.uint8 and got.shape == (6, 2, TOPK)
    assert torch.equal(got.long(), torch.from_numpy(every[:, 1:]).long())
    only_moe = every[:, 1:]
    assert torch.equal(aligned_routes(only_moe, 7, MOE, EXPERTS), got)
    # a newer engine returning the prompt's rows apart: prompt first, then the response's
    assert torch.equal(aligned_routes(every[4:], 7, MOE, EXPERTS, prompt_routes=every[:4]), got)
    with pytest.raises(UserError, match="7 rows for 7 tokens, expected 6"):
        aligned_routes(_routes(7, 3), 7, MOE, EXPERTS)
    with pytest.raises(UserError, match="4 layers, the model has 3 layers of which 2 are MoE"):
        aligned_routes(_routes(6, 4), 7, MOE, EXPERTS)
    bad = every.copy()
    bad[0, 1, 0] = EXPERTS
    with pytest.raises(UserError, match=r"outside \[0, 8\)"):
        aligned_routes(bad, 7, MOE, EXPERTS)


def _output(prompt, response, finish="stop", routes=True, seed=0):
    logprobs = [{t: SimpleNamespace(logprob=-0.1 * (i + 1)), t + 1: SimpleNamespace(logprob=-9)}
                for i, t in enumerate(response)]  # the sampled token is not the only entry
    completion = SimpleNamespace(
        token_ids=list(response), logprobs=logprobs, finish_reason=finish,
        routed_experts=_routes(len(prompt) + len(response) - 1, len(MOE), seed) if routes
        else None)
    return SimpleNamespace(request_id="r0", prompt_token_ids=list(prompt), outputs=[completion])


def test_rollout_from_output() -> None:
    out = _output([1, 2, 3], [7, 8], finish="length")
    r = rollout_from_output(out, MOE, EXPERTS)
    assert r.prompt_ids.tolist() == [1, 2, 3] and r.response_ids.tolist() == [7, 8]
    assert torch.allclose(r.logprobs, torch.tensor([-0.1, -0.2]))
    assert r.finish_reason == "length"
    raw = out.outputs[0].routed_experts
    assert torch.equal(r.routed_experts.long(), torch.from_numpy(raw[:, 1:]).long())
    assert r.routed_experts.shape == (4, 2, TOPK)
    dense = rollout_from_output(_output([1], [2], routes=False), None, 0)
    assert dense.routed_experts is None
    with pytest.raises(RuntimeError, match="enable_return_routed_experts"):
        rollout_from_output(_output([1], [2], routes=False), MOE, EXPERTS)
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        rollout_from_output(_output([1], [2], finish="abort"), MOE, EXPERTS)


class FakeLLM:
    """vllm.LLM's colocated surface: generate, collective_rpc, reset_prefix_cache, sleep,
    wake_up; records every call."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.loaded: list[str] = []
        self.asleep: set[str] = set()

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append("generate")
        assert self.asleep == set(), "generate while asleep"
        assert params["logprobs"] == 0
        return [_output(p["prompt_token_ids"], [9] * params["max_tokens"], "length", seed=i)
                for i, p in enumerate(prompts)]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(f"rpc:{method}")
        assert "weights" not in self.asleep, "loading into sleeping weights"
        assert "kv_cache" in self.asleep, "KV cache woken before the weights were loaded"
        for name, tensor in kwargs["weights_iterator"]:
            assert isinstance(tensor, torch.Tensor)
            self.loaded.append(name)
        return [None]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append("reset_prefix_cache")
        return True

    def sleep(self, level=1, mode="abort"):
        self.calls.append(f"sleep:{level}")
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        self.calls.append("wake:" + ",".join(tags))
        self.asleep -= set(tags)
        return not self.asleep


def test_engine_contract_with_a_fake_llm() -> None:
    llm = FakeLLM()
    engine = VLLMEngine("/m", VLLMOptions(), moe_layers=MOE, num_experts=EXPERTS, llm=llm)
    assert isinstance(engine, RolloutEngine)
    assert llm.calls == ["sleep:2"]  # built asleep: the first sync brings the weights
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate([[1, 2]], SamplingParams(max_tokens=3))
    with pytest.raises(RuntimeError, match="wake_up"):
        engine.update_weights([("a", torch.zeros(2))])

    weights = ((f"model.layers.{i}.w", torch.ones(4)) for i in range(5))  # a lazy stream
    engine.wake_up(["weights"])
    loaded = engine.update_weights(weights)
    engine.wake_up(["kv_cache"])
    assert loaded == 5 * 16
    assert llm.loaded == [f"model.layers.{i}.w" for i in range(5)]
    assert llm.calls[1:] == ["wake:weights", "rpc:reload_weights", "reset_prefix_cache",
                             "wake:kv_cache"]

    batch = engine.generate([[1, 2, 3], [4]], SamplingParams(max_tokens=2))
    assert [r.prompt_ids.tolist() for r in batch.rollouts] == [[1, 2, 3], [4]]
    assert [r.routed_experts.shape[0] for r in batch.rollouts] == [4, 2]  # P + R - 1
    engine.sleep()
    assert llm.calls[-1] == "sleep:2"
    with pytest.raises(UserError, match="at least one token"):
        engine.wake_up() or engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="unknown tags"):
        engine.wake_up(["scheduling"])


def test_sync_protocol_one_streamed_load(monkeypatch) -> None:
    """`sync_weights` against the vLLM engine: weights woken, all buckets in ONE reload call,
    prefix cache reset, KV cache woken last; an engine that stops reading is an error."""
    import megarl.megatron.weights as weights
    from megarl.rollout.sync import sync_weights

    tensors = [(f"t{i}", torch.full((256,), float(i))) for i in range(10)]  # 1 KiB each
    monkeypatch.setattr(weights, "export_hf_weights", lambda models, config: iter(tensors))
    llm = FakeLLM()
    engine = VLLMEngine("/m", VLLMOptions(), moe_layers=MOE, num_experts=EXPERTS, llm=llm)
    metrics = sync_weights([], engine, {}, bucket_bytes=3 << 10)
    assert llm.loaded == [n for n, _ in tensors]
    assert llm.calls.count("rpc:reload_weights") == 1
    assert llm.calls[1:] == ["wake:weights", "rpc:reload_weights", "reset_prefix_cache",
                             "wake:kv_cache"]
    assert metrics["sync/buckets"] == 4 and metrics["sync/bytes"] == 10 * 1024
    assert metrics["sync/largest_bucket_bytes"] == 3 << 10

    class Lazy(FakeLLM):
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            next(iter(kwargs["weights_iterator"]))  # reads one tensor only
            return [None]

    lazy = VLLMEngine("/m", VLLMOptions(), moe_layers=MOE, num_experts=EXPERTS, llm=Lazy())
    with pytest.raises(RuntimeError, match="left 9 tensors unread"):
        sync_weights([], lazy, {}, bucket_bytes=3 << 10)
