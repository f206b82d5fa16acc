"""megatron-core's distributed Adam for megarl's model chunks."""

from __future__ import annotations

from typing import Any

import megatron.core.optimizer as mcore_optimizer
import torch
from megatron.core.optimizer import OptimizerConfig

from megarl.config import TrainerConfig


def build_optimizer(
    models: list[Any],
    trainer: TrainerConfig,
    *,
    params_dtype: torch.dtype = torch.bfloat16,
    adam_eps: float = 1e-8,
    distributed: bool = True,
) -> Any:
    """Adam with grad clipping ``trainer.grad_clip`` (0 = off); fp32 master weights under bf16.

    ``distributed`` shards optimizer state over DP (megatron's distributed optimizer); it must
    match the DDP wrapper's ``use_distributed_optimizer``.
    """
    config = OptimizerConfig(
        optimizer="adam",
        lr=trainer.lr,
        min_lr=trainer.min_lr,
        weight_decay=trainer.weight_decay,
        adam_beta1=trainer.adam_beta1,
        adam_beta2=trainer.adam_beta2,
        adam_eps=adam_eps,
        clip_grad=trainer.grad_clip,
        bf16=params_dtype is torch.bfloat16,
        fp16=False,
        params_dtype=params_dtype,
        use_distributed_optimizer=distributed,
    )
    # module attribute on purpose: CPU runs wrap it (megarl/megatron/cpu.py)
    optimizer = mcore_optimizer.get_megatron_optimizer(config, models)
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        _tolerate_torch_adam_step(inner)
    return optimizer


def _tolerate_torch_adam_step(optimizer: Any) -> None:
    """Let a fully reshardable checkpoint load into torch's own Adam, exactly.

    Without TE or Apex megatron falls back to ``torch.optim.Adam``, which keeps a per-parameter
    ``step`` tensor. megatron-core 0.19 saves that step in the param groups and, on load, has two
    faults we work around here:

    - its per-parameter copy looks ``step`` up among the loaded tensors and fails with
      ``KeyError: 'step'``; marking it absent (``None`` is skipped by that copy) keeps the step
      restored from the param groups;
    - it restores one step tensor shared by every parameter, which torch's Adam then increments
      once per parameter per step (wrong bias correction from the first step after a resume);
      each parameter gets its own copy after the load.
    """
    set_states = getattr(optimizer, "_set_main_param_and_optimizer_states", None)
    if set_states is None:
        return
    load_state_dict = optimizer.load_state_dict

    def set_states_keeping_step(model_param: Any, tensors: dict[str, Any]) -> None:
        set_states(model_param, {"step": None, **tensors})

    def load_state_dict_with_own_steps(state_dict: Any) -> None:
        load_state_dict(state_dict)
        for state in optimizer.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    optimizer._set_main_param_and_optimizer_states = set_states_keeping_step
    optimizer.load_state_dict = load_state_dict_with_own_steps
