"""Finite updates only: an update that leaves the policy non-finite is undone exactly and
counted; ``trainer.max_bad_updates`` of them in a row stop the run with one line and no
checkpoint of that step; every checkpoint written holds finite weights and optimizer state; a
non-finite policy is caught before the engine samples, naming the step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megarl.megatron.update_guard import UpdateGuard
from megarl.metrics import combine_updates
from megarl.rollout.engine import NonFiniteRollout, Rollout, SamplingParams, check_rollouts
from megarl.rollout.hf import _sample
from megarl.run_checkpoints import verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = "examples/configs/quickstart.yaml"


def train(logdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megarl", "train", QUICKSTART, f"logging.dir={logdir}",
         "logging.run_name=run", "logging.sinks=[jsonl]", *overrides],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr[-3000:]
    return errors[0]


def tensors(checkpoint_policy: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every floating tensor of a megatron distributed checkpoint, by flattened name."""
    out = tmp_path / "flat.pt"
    dcp_to_torch_save(str(checkpoint_policy), str(out))
    found: dict[str, torch.Tensor] = {}

    def walk(x: object, name: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(x, torch.Tensor) and x.is_floating_point():
            found[name] = x

    walk(torch.load(out, weights_only=False), "")
    return found


def test_an_exploding_lr_is_undone_then_stops_the_run_with_intact_checkpoints(
        tmp_path: Path) -> None:
    r = train(tmp_path, "trainer.steps=4", "trainer.lr=1e30", "trainer.min_lr=0",
              "checkpoint.save_every=1")
    line = one_error_line(r)
    # quickstart: 2 updates a step; both of step 1 undone, the first of step 2 is the third
    assert line.startswith("error: step 2: 3 updates in a row were skipped or undone"), line
    assert "log-probs not finite after the update" in line
    assert "continues from step_000001" in line and "trainer.lr" in line
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001"]  # none of step 2
    assert verify_checkpoint(ckpts / "step_000001") is None
    saved = tensors(ckpts / "step_000001" / "policy", tmp_path)
    assert any(name.startswith("optimizer.state.exp_avg") for name in saved)
    for name, t in saved.items():
        assert torch.isfinite(t).all(), name
        assert t.numel() == 0 or float(t.abs().max()) <= 10.0, name  # initial, not 1e30
    (record,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
                 .splitlines()]
    assert record["step"] == 1
    assert record["train/skipped_update"] == 2 and record["train/undone_update"] == 2
    # the skipped updates' metrics are still reported (every update was skipped)
    assert record["train/num_sequences"] == 128


def test_an_infinite_lr_is_refused_before_anything_starts(tmp_path: Path) -> None:
    line = one_error_line(train(tmp_path, "trainer.lr=.inf"))
    assert line.startswith("error: trainer.lr=inf"), line
    assert not (tmp_path / "run").exists()


def test_a_non_finite_policy_is_caught_before_sampling_naming_the_step(tmp_path: Path) -> None:
    first = train(tmp_path / "first", "trainer.steps=1", "checkpoint.save_hf=true")
    assert first.returncode == 0, first.stderr[-3000:]
    hf = tmp_path / "first" / "run" / "hf"
    (weights,) = list(hf.glob("*.safetensors"))
    state = load_file(weights)
    state["lm_head.weight"][3] = float("nan")  # one token's logit, at every position
    save_file(state, weights, metadata={"format": "pt"})
    r = train(tmp_path / "second", "trainer.steps=2", f"model.name_or_path={hf}",
              "model.random_init=false", "checkpoint.save_every=1")
    line = one_error_line(r)
    assert line.startswith("error: step 1: the policy's next-token logits are not finite"), line
    assert not list((tmp_path / "second" / "run" / "checkpoints").glob("step_*"))

    # a NaN the engine's forward hides (one query weight) still never reaches a checkpoint
    state = load_file(weights)
    state["lm_head.weight"][3] = 0.0
    state[next(n for n in state if n.endswith("q_proj.weight"))][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    r = train(tmp_path / "third", "trainer.steps=2", f"model.name_or_path={hf}",
              "model.random_init=false", "checkpoint.save_every=1")
    line = one_error_line(r)
    assert line == ("error: step 1: parameters and fp32 main parameters not finite; not "
                    "writing its checkpoint"), line
    assert not list((tmp_path / "third" / "run" / "checkpoints").glob("step_*"))


# ---- the guard itself, on torch's Adam (megatron's optimizer on the CPU) ---------------------


def _model_and_optimizer() -> tuple[torch.nn.Module, SimpleNamespace]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, SimpleNamespace(optimizer=adam)  # megatron's wrapper holds the torch one


def _update(model: torch.nn.Module, optimizer: SimpleNamespace, lr: float) -> None:
    for group in optimizer.optimizer.param_groups:
        group["lr"] = lr
    optimizer.optimizer.zero_grad()
    model(torch.ones(4, 8)).square().sum().backward()
    optimizer.optimizer.step()


def _state(model: torch.nn.Module, optimizer: SimpleNamespace) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for v in optimizer.optimizer.state[p].values()]
    return out


def _same_state(one: tuple, other: tuple) -> bool:
    return all(torch.equal(a, b) for a, b in zip(_state(*one), _state(*other), strict=True))


def test_restore_undoes_an_update_exactly_and_the_next_one_matches() -> None:
    model, opt = _model_and_optimizer()
    _update(model, opt, 1e-2)
    guard = UpdateGuard([model], opt)
    before = _state(model, opt)
    guard.snapshot()
    _update(model, opt, 1e30)
    assert guard.nonfinite_state() is None  # 1e30 weights are finite: the probe finds them
    guard.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, _state(model, opt), strict=True))
    # the run goes on as if the bad update never happened
    twin, twin_opt = _model_and_optimizer()
    _update(twin, twin_opt, 1e-2)
    _update(model, opt, 1e-2)
    _update(twin, twin_opt, 1e-2)
    assert _same_state((model, opt), (twin, twin_opt))


def test_restoring_the_first_update_leaves_a_fresh_adam() -> None:
    model, opt = _model_and_optimizer()
    guard = UpdateGuard([model], opt)
    guard.snapshot()  # no optimizer state yet
    _update(model, opt, 1e30)
    guard.restore()
    fresh, fresh_opt = _model_and_optimizer()
    _update(model, opt, 1e-2)
    _update(fresh, fresh_opt, 1e-2)
    assert _same_state((model, opt), (fresh, fresh_opt))


def test_nonfinite_state_names_what_is_not_finite() -> None:
    model, opt = _model_and_optimizer()
    _update(model, opt, 1e-2)
    guard = UpdateGuard([model], opt)
    assert guard.nonfinite_state() is None
    first = next(iter(model.parameters()))
    opt.optimizer.state[first]["exp_avg"][0, 0] = float("inf")
    assert guard.nonfinite_state() == "optimizer moments not finite"
    with torch.no_grad():
        first[0, 0] = float("nan")
    assert guard.nonfinite_state() == ("parameters and fp32 main parameters and optimizer "
                                       "moments not finite")


def test_engines_refuse_non_finite_distributions() -> None:
    params = SamplingParams(temperature=1.0, max_tokens=1)
    logits = torch.zeros(3, 5)
    logits[1, 2] = float("nan")
    with pytest.raises(NonFiniteRollout, match="logits are not finite"):
        _sample(logits, params, torch.Generator().manual_seed(0))
    masked = torch.zeros(2, 5)
    masked[:, 0] = float("-inf")  # a masked token is fine
    token, logp = _sample(masked, params, torch.Generator().manual_seed(0))
    assert (token != 0).all() and torch.isfinite(logp).all()

    def rollout(logprobs: list[float]) -> Rollout:
        return Rollout(prompt_ids=torch.tensor([1]), response_ids=torch.tensor([2] * len(logprobs)),
                       logprobs=torch.tensor(logprobs), finish_reason="length")

    check_rollouts([rollout([-0.5, -1.0])])
    for bad in (float("nan"), float("-inf"), 0.7):
        with pytest.raises(NonFiniteRollout, match="1 of 2 responses"):
            check_rollouts([rollout([-0.5]), rollout([-0.1, bad])])


def test_a_step_reports_its_undone_updates_and_the_good_updates_metrics() -> None:
    good = {"train/skipped_update": 0.0, "train/undone_update": 0.0, "ratio/max": 1.5}
    undone = {"train/skipped_update": 1.0, "train/undone_update": 1.0, "ratio/max": 9.0}
    step = combine_updates([good, undone, good])
    assert step["train/skipped_update"] == 1.0 and step["train/undone_update"] == 1.0
    assert step["ratio/max"] == 1.5
