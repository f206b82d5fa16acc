"""Grouped-GEMM MoE experts for megatron-core without Transformer-Engine (``torch._grouped_mm``).

Without TE, megatron-core's local spec builds the routed experts as ``SequentialMLP``: one
``MLP`` per local expert, run one after the other (128 small GEMM pairs and their backward per
layer for Qwen3-30B-A3B). `GroupedGemmExperts` is a drop-in replacement for it: it plugs into
megatron's experts builder (``MoESubmodules.experts``; `with_grouped_experts` swaps it into a
layer spec), takes the same ``(permuted tokens, tokens_per_expert, permuted_probs)`` and runs
each of the two expert projections as ONE grouped GEMM over all local experts.

The weights are stacked parameters, ``linear_fc1.weight`` ``[E_local, 2F/etp, H]`` and
``linear_fc2.weight`` ``[E_local, H, F/etp]``: ``weight[j]`` is SequentialMLP's expert ``j``
(same init calls, same seed, same weights) and ``weight.transpose(1, 2)`` is the operand
``torch._grouped_mm`` wants, so no weight is copied at run time. Names stay SequentialMLP's where
anything sees them: `sharded_state_dict` emits its per-expert ShardedTensors (checkpoints are
interchangeable) and `named_expert_tensors` its per-expert views (HF conversion, weight sync).
Where ``torch._grouped_mm`` cannot run the operands (or ``impl="loop"``) a per-expert loop of
megatron's own linear function is the reference. Why stacked parameters rather than stacking in
forward, with the numbers, and what is supported: docs/megatron.md, "Grouped-GEMM experts".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
    linear_with_grad_accumulation_and_async_allreduce,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import get_pg_rank, get_pg_size, make_tp_sharded_tensor_for_checkpoint
from torch import Tensor

Impl = Literal["auto", "grouped_mm", "loop"]
IMPLS: tuple[str, ...] = ("auto", "grouped_mm", "loop")

logger = logging.getLogger(__name__)
_STACKED = re.compile(r"^(.*\.experts\.)(linear_fc[12])\.weight$")


# ---- kernels --------------------------------------------------------------------------------


def grouped_mm_unsupported(x: Tensor, weights: Sequence[Tensor]) -> str | None:
    """Why ``torch._grouped_mm`` cannot run ``x @ w[e].T`` for these operands (None: it can).

    Its constraints (torch 2.14, ``_meta_registrations._meta_grouped_mm_common`` and the
    kernels): float32 / bfloat16 / float16 on CPU, bfloat16 on CUDA (float16 needs cuBLASLt
    grouped GEMM, CUDA >= 13.3; not used here), both operands' leading strides multiples of
    16 bytes and their data 16-byte aligned, int32 cumulative offsets."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm"
    if x.device.type == "cuda":
        if x.dtype is not torch.bfloat16:
            return f"{x.dtype} on CUDA (the grouped GEMM kernel takes bfloat16)"
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return "a CUDA device below SM80"
    elif x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"{x.dtype} on CPU"
    else:
        return f"device {x.device.type}"
    align = 16 // x.element_size()  # x's row length, both weight dims (forward and backward)
    for t, dims in ((x, x.shape[-1:]), *((w, w.shape[-2:]) for w in weights)):
        if t.dtype is not x.dtype:
            return f"mixed dtypes {x.dtype} and {t.dtype}"
        if any(d % align for d in dims):
            return f"shape {tuple(t.shape)}: dims must be multiples of {align} ({x.dtype})"
        if t.data_ptr() % 16:  # e.g. a parameter placed unaligned in a flat DDP buffer
            return "an operand not 16-byte aligned in memory"
    return None


def expert_offsets(tokens_per_expert: Tensor, device: torch.device) -> Tensor:
    """int32 cumulative ends of the experts' row groups, on `device` (``torch._grouped_mm``'s
    ``offs``). megatron's dispatchers hand over the counts on the CPU: one small copy."""
    offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    return offs.to(device, non_blocking=True)


def grouped_linear(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """``y[rows of e] = x[rows of e] @ weight[e].T`` in one grouped GEMM (autograd: torch's)."""
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)


def looped_linear(x: Tensor, weight: Tensor, counts: Sequence[int]) -> Tensor:
    """The reference: SequentialMLP's GEMM calls (megatron's linear function), expert by expert.

    ``unbind`` once, so backward stacks the per-expert weight gradients in one copy (indexing
    ``weight[e]`` per expert would materialise a full-size gradient per expert)."""
    outputs = [
        linear_with_grad_accumulation_and_async_allreduce(
            rows, w, None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
            sequence_parallel=False,
        )  # fmt: skip
        for rows, w in zip(torch.split(x, list(counts)), weight.unbind(0), strict=True)
    ]
    return torch.cat(outputs, dim=0)


# ---- the module -----------------------------------------------------------------------------


class _StackedLinear(torch.nn.Module):
    """Holds one stacked expert weight ``[E_local, out, in]`` as ``weight``."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def extra_repr(self) -> str:
        e, out, inp = self.weight.shape
        return f"experts={e}, in={inp}, out={out}"


class GroupedGemmExperts(MegatronModule):
    """The routed experts of one MoE layer as two grouped GEMMs (see the module docstring).

    Built by megatron's ``MoELayer`` as ``experts(num_local_experts, config, pg_collection=...,
    name=...)``; ``impl`` (bind it with `functools.partial`) picks the kernel: ``auto``
    (``torch._grouped_mm`` where it runs, else the loop), ``grouped_mm`` (fail where it does
    not run), ``loop`` (the reference)."""

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        pg_collection: Any = None,
        name: str | None = None,
        impl: Impl = "auto",
    ) -> None:
        super().__init__(config=config)
        _check_supported(config)
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r}: one of {', '.join(IMPLS)}")
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(
                required_pgs=["ep", "expt_tp", "expt_dp"]
            )
        self.impl = impl
        self.name = name
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = (
            pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp)  # fmt: skip
        etp, etp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
        if ffn % etp:
            raise ValueError(f"moe_ffn_hidden_size {ffn} does not split over expert TP {etp}")
        fc1_out = 2 * ffn if config.gated_linear_unit else ffn
        fc1_stride = 2 if config.gated_linear_unit else 1
        on_cpu = config.use_cpu_initialization
        device = torch.device("cpu") if on_cpu else torch.cuda.current_device()

        def stacked(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.empty(num_local_experts, *shape, device=device,
                                                  dtype=config.params_dtype))

        w1, w2 = stacked(fc1_out // etp, hidden), stacked(hidden, ffn // etp)
        if config.perform_initialization:  # SequentialMLP's calls, in its order (same RNG draws)
            _init_like_sequential(w1, w2, config, fc1_stride, etp, etp_rank)
        # the attributes megatron's linear layers give expert weights (DDP buckets, optimizer
        # groups, grad-norm de-duplication): TP-sharded along the per-expert out / in dim
        set_tensor_model_parallel_attributes(w1, is_parallel=True, dim=1, stride=fc1_stride)
        set_tensor_model_parallel_attributes(w2, is_parallel=True, dim=2, stride=1)
        expert_pgs = config.expert_model_parallel_size > 1 or (
            config.expert_tensor_parallel_size != config.tensor_model_parallel_size)
        for w in (w1, w2):
            w.allreduce = not expert_pgs
        self.linear_fc1 = _StackedLinear(w1)
        self.linear_fc2 = _StackedLinear(w2)
        self._warned_fallback = False

    # ---- forward ------------------------------------------------------------------------------

    def forward(
        self,
        permuted_local_hidden_states: Tensor,
        tokens_per_expert: Tensor,
        permuted_probs: Tensor,
    ) -> tuple[Tensor, None]:
        """Experts' outputs for tokens grouped by local expert (``tokens_per_expert`` rows each),
        scaled by their routing probabilities; same contract as SequentialMLP.forward."""
        hidden, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ValueError("`moe_apply_probs_on_input` only works with moe_router_topk=1")
            dtype = hidden.dtype
            hidden = (probs.unsqueeze(-1) * hidden).to(dtype)
            probs = torch.ones_like(probs)
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        w1, w2 = self.linear_fc1.weight, self.linear_fc2.weight
        if tokens_per_expert.numel() != self.num_local_experts:
            raise ValueError(f"tokens_per_expert has {tokens_per_expert.numel()} entries for "
                             f"{self.num_local_experts} local experts")
        if tokens_per_expert.device.type == "cpu" and int(tokens_per_expert.sum()) != x.shape[0]:
            raise ValueError(f"tokens_per_expert sums to {int(tokens_per_expert.sum())}, the "
                             f"input has {x.shape[0]} rows")
        if self._use_grouped_mm(x, w1, w2):
            offs = expert_offsets(tokens_per_expert, x.device)
            x = x if x.is_contiguous() else x.contiguous()
            fc1 = grouped_linear(x, w1, offs)
            out = grouped_linear(self._activation(fc1, probs), w2, offs)
        else:
            counts = tokens_per_expert.tolist()
            out = looped_linear(self._activation(looped_linear(x, w1, counts), probs), w2, counts)
        return out.reshape(*shape[:-1], out.shape[-1]), None

    def _use_grouped_mm(self, x: Tensor, w1: Tensor, w2: Tensor) -> bool:
        if self.impl == "loop" or x.shape[0] == 0:  # no rows: nothing to group (and the weight
            return False  # gradient's contraction dim would be 0, which the CUDA kernel refuses)
        why = grouped_mm_unsupported(x, (w1, w2))
        if why is None:
            return True
        if self.impl == "grouped_mm":
            raise RuntimeError(f"GroupedGemmExperts(impl='grouped_mm'): {why}")
        if not self._warned_fallback:
            logger.warning("GroupedGemmExperts %s: torch._grouped_mm cannot run %s; looping "
                           "over the experts", self.name or "", why)
            self._warned_fallback = True
        return False

    def _activation(self, fc1: Tensor, probs: Tensor) -> Tensor:
        """megatron MLP.forward's activation for this config, probs applied per token."""
        config = self.config
        scale = probs.unsqueeze(-1)
        if config.bias_activation_fusion:
            if not (config.gated_linear_unit and config.activation_func is F.silu):
                raise ValueError("bias_activation_fusion with experts supports SwiGLU only")
            return weighted_bias_swiglu_impl(
                fc1, None, scale, config.activation_func_fp8_input_store
            )
        if config.gated_linear_unit:
            gate, linear = torch.chunk(fc1, 2, dim=-1)
            if (clamp := config.activation_func_clamp_value) is not None:
                gate = gate.clamp(min=None, max=clamp)
                linear = linear.clamp(min=-clamp, max=clamp)
            if config.glu_linear_offset:  # 0 in megatron's default: skip a pass over [T, F]
                linear = linear + config.glu_linear_offset
            act = config.activation_func(gate) * linear
        else:
            act = config.activation_func(fc1)
        return (act * scale).to(act.dtype)

    def backward_dw(self) -> None:
        """Weight gradients are computed in backward (no delayed wgrad)."""

    # ---- checkpoints --------------------------------------------------------------------------

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, ShardedTensorFactory]:
        """SequentialMLP's ShardedTensors, one factory per stacked weight (see module doc)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = {}
        for name in ("linear_fc1", "linear_fc2"):
            weight = getattr(self, name).weight
            build = partial(self._build_expert_pieces, name=name, prefix=prefix,
                            sharded_offsets=tuple(sharded_offsets), metadata=metadata)
            out[f"{prefix}{name}.weight"] = ShardedTensorFactory(
                key=f"{prefix}experts.{name}.weight",
                data=weight,
                build_fn=build,
                merge_fn=partial(_merge_expert_pieces, gated=self._gated(name)),
                replica_id=(0, 0, get_pg_rank(self.dp_group)),
            )
        return out

    def _gated(self, name: str) -> bool:
        return name == "linear_fc1" and self.config.gated_linear_unit

    def _build_expert_pieces(
        self, key: str, data: Tensor, replica_id: Any, flattened_range: Any, *, name: str,
        prefix: str, sharded_offsets: tuple, metadata: dict,
    ) -> list[ShardedTensor]:  # fmt: skip
        """The ShardedTensors SequentialMLP saves for its experts' weight `name`, expert by
        expert (gated fc1: gate then up per expert); a flat list.

        `key` is the factory's (megatron's optimizer prefixes it for its state tensors) and
        `data` a tensor shaped like the stacked weight (the weight or an optimizer state)."""
        if flattened_range is not None:
            raise NotImplementedError("flattened expert weights are not supported")
        singleton = metadata.get("singleton_local_shards", False)
        num_global = get_pg_size(self.ep_group) * self.num_local_experts
        first = get_pg_rank(self.ep_group) * self.num_local_experts
        stem, marker, tail = key.rpartition("experts.")
        if not marker:
            raise ValueError(f"expert weight key {key!r} has no 'experts.'")
        tp_axis = 0 if name == "linear_fc1" else 1
        pieces = []
        for j in range(self.num_local_experts):
            g = first + j
            if singleton:
                offsets, sh_key = sharded_offsets, f"{stem}experts.{g}.{tail}"
            else:
                offsets = (*sharded_offsets, (len(sharded_offsets), g, num_global))
                sh_key = key
            sh = make_tp_sharded_tensor_for_checkpoint(
                data[j], sh_key, tp_axis, replica_id=replica_id, prepend_offsets=offsets,
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
            )  # fmt: skip
            if self._gated(name):
                factory = apply_swiglu_sharded_factory(
                    sh, offsets, singleton, tp_group=self.tp_group,
                    dp_group=metadata["dp_cp_group"],
                )  # fmt: skip
                gate_up = factory.build()
                if len(gate_up) != 2:
                    raise ValueError(f"{sh_key}: expected gate and up pieces, got {gate_up}")
                pieces.extend(gate_up)
            else:
                pieces.append(sh)
        return pieces


def _merge_expert_pieces(loaded: list[Tensor], gated: bool) -> Tensor:
    """The stacked weight from the pieces `_build_expert_pieces` described."""
    if gated:
        return torch.stack([torch.cat(loaded[i:i + 2], dim=0) for i in range(0, len(loaded), 2)])
    return torch.stack(list(loaded))


@torch.no_grad()
def _init_like_sequential(
    w1: Tensor, w2: Tensor, config: TransformerConfig, fc1_stride: int, etp: int, etp_rank: int
) -> None:
    """SequentialMLP's initialisation: per expert, its linear_fc1 then its linear_fc2, by the
    calls its ColumnParallelLinear / RowParallelLinear make (so the same RNG draws)."""
    hidden, fc1_out, ffn = w1.shape[2], w1.shape[1] * etp, w2.shape[2] * etp
    for j in range(w1.shape[0]):
        if config.use_cpu_initialization:
            _initialize_affine_weight_cpu(
                w1[j], fc1_out, hidden, fc1_out // etp, 0, config.init_method,
                stride=fc1_stride, rank=etp_rank, world_size=etp,
                skip_set_tensor_parallel_attributes=True,
            )  # fmt: skip
            _initialize_affine_weight_cpu(
                w2[j], hidden, ffn, ffn // etp, 1, config.output_layer_init_method,
                params_dtype=config.params_dtype, rank=etp_rank, world_size=etp,
                skip_set_tensor_parallel_attributes=True,
            )  # fmt: skip
        else:
            _initialize_affine_weight_gpu(w1[j], config.init_method, 0, fc1_stride, True)
            _initialize_affine_weight_gpu(w2[j], config.output_layer_init_method, 1, 1, True)


def _check_supported(config: TransformerConfig) -> None:
    unsupported = {
        "add_bias_linear": config.add_bias_linear,
        "fp8": bool(config.fp8),
        "fp4": bool(getattr(config, "fp4", None)),
        "moe_latent_size": getattr(config, "moe_latent_size", None) is not None,
        "use_te_activation_func": getattr(config, "use_te_activation_func", False),
        "delay_wgrad_compute": getattr(config, "delay_wgrad_compute", False),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"GroupedGemmExperts does not support {', '.join(bad)}: use "
                         "SequentialMLP (model.grouped_experts=false) or the TE spec")


# ---- plugging in ----------------------------------------------------------------------------


def experts_builder(impl: Impl = "auto") -> Callable[..., GroupedGemmExperts]:
    """A megatron ``ExpertsBuilder`` for `GroupedGemmExperts`."""
    return partial(GroupedGemmExperts, impl=impl)


def with_grouped_experts(block_spec: Any, impl: Impl = "auto") -> Any:
    """`block_spec` (a decoder block spec of megatron's local spec) with every MoE layer's
    SequentialMLP experts replaced by `GroupedGemmExperts`; other layers are untouched.

    The layer specs are shared objects in megatron: they are rebuilt, never modified."""
    import dataclasses

    def swap_mlp(mlp: Any) -> Any:
        if not (isinstance(mlp, partial) and isinstance(mlp.func, type)
                and issubclass(mlp.func, MoELayer)):  # fmt: skip
            return mlp
        sub = mlp.keywords["submodules"]
        experts = sub.experts
        if not (isinstance(experts, partial) and experts.func is SequentialMLP):
            return mlp  # TE / inference experts: leave them
        keywords = {**mlp.keywords,
                    "submodules": dataclasses.replace(sub, experts=experts_builder(impl))}
        return partial(mlp.func, *mlp.args, **keywords)

    def swap_layer(spec: Any) -> Any:
        sub = getattr(spec, "submodules", None)
        if sub is None or not hasattr(sub, "mlp"):
            return spec
        new_mlp = swap_mlp(sub.mlp)
        if new_mlp is sub.mlp:
            return spec
        return dataclasses.replace(spec, submodules=dataclasses.replace(sub, mlp=new_mlp))

    return dataclasses.replace(block_spec, layer_specs=[swap_layer(s)
                                                        for s in block_spec.layer_specs])


# ---- names ----------------------------------------------------------------------------------


def per_expert(name: str, tensor: Tensor) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)``, or for a `GroupedGemmExperts` stacked weight (or a tensor shaped
    like it: its gradient) SequentialMLP's per-expert names with views of the tensor."""
    match = _STACKED.match(name)
    if match is None or tensor.dim() != 3:
        yield name, tensor
        return
    head, linear = match.groups()
    for j in range(tensor.shape[0]):
        yield f"{head}local_experts.{j}.{linear}.weight", tensor[j]


def named_expert_tensors(
    model: torch.nn.Module, of: Callable[[torch.nn.Parameter], Tensor] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """``model.named_parameters()`` in SequentialMLP's naming: stacked expert weights come out
    as per-expert views (writable: copying into one writes the stacked parameter). `of` maps
    a parameter to the tensor to yield (e.g. its ``main_grad``)."""
    for name, param in model.named_parameters():
        yield from per_expert(name, param if of is None else of(param))
