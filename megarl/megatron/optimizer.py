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
    return mcore_optimizer.get_megatron_optimizer(config, models)
