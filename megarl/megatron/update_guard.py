"""Finite updates only: an optimizer update that leaves the policy non-finite is undone.

megatron skips an update whose gradients are not finite; this covers what that check cannot
see: a finite gradient with a learning rate large enough that the new weights, the optimizer's
moments or the log-probs they produce overflow (``trainer.lr=1e30`` writes weights of ~1e30
that are finite themselves but turn the next forward pass into inf/nan). Before each update the
guard keeps a host copy of what the update changes (this rank's model parameters, the optimizer's
main parameters and moments); after it, it checks that those are finite and that one micro-batch
of the update gives finite log-probs, and copies everything back when not.

Cost: one host copy of this rank's share of the parameters and optimizer state per update, one
pass over them for the check, and one forward pass of one micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megarl.metrics import comm_device


def _inner_optimizers(optimizer: Any) -> list[Any]:
    """The torch optimizers under megatron's (chained, distributed, fp32) wrappers."""
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _model_parameters(models: list[Any]) -> list[Tensor]:
    return [p for m in models for p in (m.module if hasattr(m, "module") else m).parameters()]


@dataclass
class _Snapshot:
    params: list[Tensor]
    main_params: list[list[Tensor | None]]  # None: a view of a model parameter
    group_scalars: list[list[dict[str, Any]]]
    states: list[dict[int, dict[str, Any] | None]] = field(default_factory=list)


class UpdateGuard:
    """``snapshot()`` before an update, ``problem()`` after it, ``restore()`` to undo it."""

    def __init__(self, models: list[Any], optimizer: Any) -> None:
        self.models, self.optimizer = models, optimizer
        self._snapshot: _Snapshot | None = None

    # ---- what an update changes ---------------------------------------------------------------

    def _main_params(self) -> list[list[Tensor]]:
        return [[p for group in opt.param_groups for p in group["params"]]
                for opt in _inner_optimizers(self.optimizer)]

    def snapshot(self) -> None:
        """Keep a host copy of the parameters and optimizer state the next update changes
        (into the previous snapshot's host tensors when it has them)."""
        old = self._snapshot
        reuse = iter([] if old is None else [*old.params, *(t for ts in old.main_params
                                                             for t in ts if t is not None)])
        reuse_state = iter([] if old is None else [v for st in old.states for d in st.values()
                                                   if d for v in d.values()])

        def copy(t: Tensor, pool: Any) -> Tensor:
            host = next(pool, None)
            if isinstance(host, Tensor) and host.shape == t.shape and host.dtype == t.dtype:
                return host.copy_(t.detach())
            return t.detach().to("cpu", copy=True)

        mains = self._main_params()
        states = []
        for opt, params in zip(_inner_optimizers(self.optimizer), mains, strict=True):
            saved: dict[int, dict[str, Any] | None] = {}
            for i, p in enumerate(params):
                state = opt.state.get(p)
                saved[i] = None if not state else {
                    k: copy(v, reuse_state) if isinstance(v, Tensor) else v
                    for k, v in state.items()}
            states.append(saved)
        model_params = _model_parameters(self.models)
        # fp32 training: the optimizer's main parameters are views of the model's own memory,
        # restored with it (one host copy, not two)
        shared = {p.untyped_storage().data_ptr() for p in model_params}
        self._snapshot = _Snapshot(
            params=[copy(p, reuse) for p in model_params],
            main_params=[[None if p.untyped_storage().data_ptr() in shared else copy(p, reuse)
                          for p in params] for params in mains],
            group_scalars=[[{k: v for k, v in g.items() if k != "params"}
                            for g in opt.param_groups]
                           for opt in _inner_optimizers(self.optimizer)],
            states=states)

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the update: parameters, main parameters and optimizer state as snapshot."""
        snap = self._snapshot
        if snap is None:
            raise RuntimeError("UpdateGuard.restore without a snapshot")
        for p, saved in zip(_model_parameters(self.models), snap.params, strict=True):
            p.copy_(saved)
        mains = self._main_params()
        for opt, params, saved_params, scalars, states in zip(
                _inner_optimizers(self.optimizer), mains, snap.main_params, snap.group_scalars,
                snap.states, strict=True):  # fmt: skip
            for p, saved in zip(params, saved_params, strict=True):
                if saved is not None:
                    p.copy_(saved)
            for group, saved in zip(opt.param_groups, scalars, strict=True):
                group.update(saved)
            for i, p in enumerate(params):
                if states[i] is None:  # before the first update: a fresh Adam's zeros (what
                    for v in opt.state.get(p, {}).values():  # torch creates lazily; megatron
                        if isinstance(v, Tensor):  # saves only a state that exists)
                            v.zero_()
                    continue
                state = opt.state[p]
                for k, v in states[i].items():
                    if isinstance(v, Tensor) and isinstance(state.get(k), Tensor):
                        state[k].copy_(v)
                    else:
                        state[k] = v.clone() if isinstance(v, Tensor) else v

    # ---- the checks ---------------------------------------------------------------------------

    def nonfinite_state(self) -> str | None:
        """What is not finite among this world's parameters and optimizer state (None: all
        finite); the flags stay on the device until one MAX all-reduce, so every rank gets the
        same answer for one host sync, not one per tensor."""
        mains = self._main_params()
        moments = [v for opt, params in zip(_inner_optimizers(self.optimizer), mains, strict=True)
                   for p in params for v in opt.state.get(p, {}).values()
                   if isinstance(v, Tensor) and v.is_floating_point()]
        bad = _max_over_world(torch.stack([
            _any_nonfinite(_model_parameters(self.models)),
            _any_nonfinite([p for params in mains for p in params]),
            _any_nonfinite(moments)]))
        names = ("parameters", "fp32 main parameters", "optimizer moments")
        found = [name for name, flag in zip(names, bad.tolist(), strict=True) if flag]
        return " and ".join(found) + " not finite" if found else None


def _any_nonfinite(tensors: list[Tensor]) -> Tensor:
    """1.0 on the host when any of `tensors` holds a NaN or inf, else 0.0 (one sync)."""
    flags = [torch.isfinite(t).logical_not().any() for t in tensors if t.numel()]
    if not flags:
        return torch.zeros(())
    return torch.stack([f.to(flags[0].device) for f in flags]).any().float().cpu()


def _max_over_world(flags: Tensor) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        flags = flags.to(comm_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags = flags.cpu()
    return flags


def all_finite_over_world(tensors: list[Tensor]) -> bool:
    """True when every rank's `tensors` are finite (one MAX all-reduce)."""
    return _max_over_world(_any_nonfinite(tensors).reshape(1)).item() == 0.0
