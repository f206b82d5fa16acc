"""Make megatron-core 0.19.2 run on CPU with gloo (the quickstart, the CPU tests).

megatron-core assumes CUDA in a few dozen places (``torch.cuda.current_device()`` as a device,
the CUDA RNG tracker, ``device="cuda"`` in the schedules and the optimizer, side streams in the
alltoall dispatcher, ``is_cuda`` checks) and gloo lacks uneven ``all_gather``. Every patch below
replaces one Python attribute; each is needed by at least one test in tests/distributed (see
shared/notes/megatron-on-cpu.md §3 for the failure each one fixes; 11 is ours: tied
embeddings under pipeline parallelism).

`install()` runs BEFORE a model is built, in processes without CUDA only: it refuses to run
when CUDA is available, so a GPU run can never be silently shimmed. The trainer calls it when
no GPU is visible; on a GPU nothing here is imported.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

CPU = torch.device("cpu")
_installed = False


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, int) and not isinstance(device, bool):
        return CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return CPU
    return device


class CudaToCpuMode(TorchFunctionMode):
    """(9) ``device="cuda"`` / int devices -> cpu, ``.cuda()`` is a no-op, and ``.type()``
    reports ``torch.cuda.*`` (the optimizers accept only CUDA tensors by that check)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        out = func(*args, **kwargs)
        if (
            func is torch.Tensor.type
            and len(args) == 1
            and not kwargs
            and isinstance(out, str)
            and out.startswith("torch.")
            and not out.startswith("torch.cuda.")
        ):
            out = "torch.cuda." + out[len("torch.") :]
        return out


class _FakeEvent:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _FakeStream:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _FakeEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _wrap_in_cpu_mode(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with CudaToCpuMode():
            return fn(*args, **kwargs)

    return inner


def install() -> None:
    """Apply every patch once per process."""
    global _installed
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megarl.megatron.cpu must not be installed on a machine with CUDA")

    # (1) torch.cuda.current_device() used as `device=` (rotary inv_freq, router, TP buffers).
    torch.cuda.current_device = lambda: CPU

    # (2) The CUDA RNG tracker (model_parallel_cuda_manual_seed, fork()) -> the CPU generator.
    import megatron.core.tensor_parallel.random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # (3) attention_mask=None builds the default causal mask with device="cuda".
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as tutils

    @functools.cache
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    tutils.get_default_causal_mask = cpu_causal_mask
    fused_softmax.get_default_causal_mask = cpu_causal_mask

    # (5) CUDA streams / events (alltoall dispatcher side stream, p2p synchronize).
    default_stream = _FakeStream()
    torch.cuda.Stream = _FakeStream
    torch.cuda.Event = _FakeEvent
    torch.cuda.current_stream = lambda *a, **k: default_stream
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None

    # (6) alltoall dispatcher: split sizes become numpy only for `is_cuda` tensors upstream.
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    # (7) MoE with TP>1 needs sequence_parallel, which WrappedTorchNorm refuses. Row-wise norms
    #     are correct under SP; tag the weights so finalize_model_grads all-reduces them over TP.
    import megatron.core.transformer.torch_norm as torch_norm

    def wrapped_torch_norm_new(
        cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
        zero_centered_gamma=False, normalization="LayerNorm",
    ):  # fmt: skip
        assert not config.layernorm_zero_centered_gamma
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        norm = norm_cls[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(wrapped_torch_norm_new)

    # (8) gloo cannot all_gather uneven lists (alltoall dispatcher under TP x EP).
    import megatron.core.tensor_parallel.mappings as mappings

    original_gather = mappings._gather_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        world, inp = group.size(), input_.contiguous()
        out = inp.new_empty([sum(output_split_sizes), *inp.shape[1:]])
        torch.distributed.all_to_all_single(
            out,
            torch.cat([inp] * world, dim=0),
            output_split_sizes=list(output_split_sizes),
            input_split_sizes=[inp.shape[0]] * world,
            group=group,
        )
        return out

    mappings._gather_along_first_dim = gather_along_first_dim

    # (9) device="cuda" in the schedules (total_num_tokens), the optimizer (found_inf, _scale,
    #     clip_grads) and its `param.type() == 'torch.cuda.FloatTensor'` checks.
    import megatron.core.pipeline_parallel.schedules as schedules

    for name in (
        "forward_backward_no_pipelining",
        "forward_backward_pipelining_without_interleaving",
        "forward_backward_pipelining_with_interleaving",
    ):
        setattr(schedules, name, _wrap_in_cpu_mode(getattr(schedules, name)))
    import megatron.core.optimizer as optimizer
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.optimizer.optimizer as optimizer_classes

    optimizer.get_megatron_optimizer = _wrap_in_cpu_mode(optimizer.get_megatron_optimizer)
    for cls in (
        optimizer_classes.MegatronOptimizer,
        optimizer_classes.MixedPrecisionOptimizer,
        optimizer_classes.FP32Optimizer,
        optimizer_classes.ChainedOptimizer,
        distrib_optimizer.DistributedOptimizer,
    ):
        # (12) ours: optimizer checkpoints gather state with `.cuda()` (fully reshardable format)
        for method in ("step", "step_with_ready_grads", "prepare_grads", "sharded_state_dict",
                       "load_state_dict"):
            if method in vars(cls):
                setattr(cls, method, _wrap_in_cpu_mode(vars(cls)[method]))

    # (11) Tied embeddings under PP: the last stage's copy of the embedding is moved with
    #      `.cuda()` while the model is built (language_module.setup_embeddings_and_output_layer).
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _wrap_in_cpu_mode(
        LanguageModule.setup_embeddings_and_output_layer
    )

    _installed = True
