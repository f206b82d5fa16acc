"""Policy losses: every objective of the papers megarl was built for, in pure torch (no
Megatron, no vLLM).

    from megarl.losses import compute_policy_loss, POLICY_LOSSES
    loss, metrics = compute_policy_loss(
        "up_gspo", log_prob, old_log_prob, advantages, mask,
        agg="seq-mean-token-mean", num_tokens=..., num_sequences=...)

A trainer resolves the run's objective once (``Objective.resolve``: loss, hyperparameters,
aggregation, KL term, entropy bonus) and calls it on every micro-batch.

Every loss is a per-token gradient weight F on the advantage (d loss / d log pi = -A F / N);
each module's docstring gives its equations. Modules by family:
    clipped.py             grpo, dapo, dr_grpo, dapo_eps_high_inf
    unbounded_positive.py  up_grpo, up_dapo, up_gspo (UP, Fan et al.)
    sequence.py            gspo, gmpo
    soft_clip.py           cispo, gppo, ce_gppo, dgpo (Fu et al., arXiv:2603.14389), sapo
    abc_grpo.py            abc_grpo (Liu and Chen, arXiv:2601.03895)
    bapo.py                bapo (Xi et al., arXiv:2510.18927)
    asymmetric.py          aspo, dppo
    reinforce.py           reinforce, up_symmetric, w_reinforce
"""

from megarl.losses import (  # noqa: F401  (importing registers the losses)
    abc_grpo,
    asymmetric,
    bapo,
    clipped,
    reinforce,
    sequence,
    soft_clip,
    unbounded_positive,
)
from megarl.losses.aggregation import aggregate_loss, count_sequences, count_tokens
from megarl.losses.api import compute_policy_loss
from megarl.losses.kl import KL_TYPES, kl_penalty
from megarl.losses.objective import Objective
from megarl.losses.registry import (
    AGG_MODES,
    POLICY_LOSSES,
    Hyper,
    PolicyLossSpec,
    get_policy_loss,
    register_policy_loss,
    validate_loss_params,
)
from megarl.losses.rollout_correction import RolloutCorrection

__all__ = [
    "AGG_MODES",
    "KL_TYPES",
    "POLICY_LOSSES",
    "Hyper",
    "Objective",
    "RolloutCorrection",
    "PolicyLossSpec",
    "aggregate_loss",
    "compute_policy_loss",
    "count_sequences",
    "count_tokens",
    "get_policy_loss",
    "kl_penalty",
    "register_policy_loss",
    "validate_loss_params",
]
