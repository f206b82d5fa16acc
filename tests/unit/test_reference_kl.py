"""The KL reference: the initial weights, swapped in for a forward pass and swapped out again
exactly (run in a subprocess: the policy starts torch.distributed and the CPU shim)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from megarl.config import load_config
    from megarl.trainer import Trainer

    run = sys.argv[1]
    config = load_config("examples/configs/quickstart.yaml", [
        "algo.kl_beta=0.1", "trainer.steps=2", "logging.sinks=[jsonl]", f"logging.dir={run}",
        "logging.run_name=run"])
    trainer = Trainer(config)
    policy = trainer.policy
    samples, _ = trainer.samples_of(trainer.sample())
    old = policy.logprobs(samples)
    ref = policy.reference_logprobs(old)
    # before any update the reference is the policy itself
    assert all(torch.equal(o.old_logprobs, r.ref_logprobs) for o, r in zip(old, ref))
    history = trainer.fit()
    assert history[-1]["kl/ref_mean"] > 0, history[-1]
    weights = policy._copy_weights()
    moved = policy.logprobs(samples)
    again = policy.reference_logprobs(samples)
    # the reference stays the initial weights; the trained weights come back bit for bit
    assert all(torch.equal(o.old_logprobs, r.ref_logprobs) for o, r in zip(old, again))
    assert any(not torch.equal(o.old_logprobs, m.old_logprobs) for o, m in zip(old, moved))
    assert all(torch.equal(a, b) for a, b in zip(weights, policy._copy_weights()))
    print("ok")
""")


def test_reference_is_the_initial_policy_and_swaps_back_exactly(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
