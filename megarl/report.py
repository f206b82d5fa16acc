"""Training-curve plots from a run's ``metrics.jsonl``: ``write_report(run_dir)``.

One PNG per figure in ``FIGURES`` (the curves RLVR papers show), written to ``run_dir/report/``,
and only when at least one of its key patterns (fnmatch) matches a logged metric. To plot
something new, add a row to ``FIGURES``. Null values (non-finite when logged) are skipped; when a
step appears twice (a resumed run appends), its last record wins. A truncated final line (a run
killed mid-write) is ignored; any other malformed line is an error.

Metric names come from megarl.losses.metrics (``region/*``, ``clip/*``, ``ratio/*``, ``kl/*``,
``entropy/mean``, ``grad_weight/*``), the per-loss extras (``clip/dual_frac``,
``dppo/masked_frac``, ``abc/*_frac``), megarl.megatron (``train/grad_norm``,
``router/replay_disagreement``), megarl.rollout.mismatch (``rollout/*``) and the trainer
(``reward/*``, ``response/*``, ``eval/<bench>/<metric>`` from megarl.eval_metrics.flatten);
``actor/*`` spellings are accepted too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from megarl.errors import UserError


@dataclass(frozen=True)
class Figure:
    """One plot: every logged metric matching one of `patterns`, one line each, against step."""

    title: str
    filename: str
    patterns: tuple[str, ...]
    ylabel: str = ""


FIGURES: tuple[Figure, ...] = (
    Figure("Reward and eval accuracy", "reward.png",
           ("reward/mean", "reward/accuracy", "actor/reward*", "eval/*/avg@*",
            "eval/*/greedy@*"), "reward / acc"),
    Figure("Eval pass@k and maj@k", "eval_pass_maj.png", ("eval/*/pass@*", "eval/*/maj@*"),
           "accuracy"),
    Figure("Entropy", "entropy.png", ("entropy/mean", "actor/entropy*"), "nats / token"),
    Figure("Distinct answers per prompt", "distinct.png", ("response/distinct_answers_frac",),
           "fraction of the n samples"),
    Figure("Distinct correct answers per prompt", "distinct_correct.png",
           ("reward/distinct_correct",), "answers"),
    Figure("Probability capacity and weights", "capacity.png", ("up/cap_*", "dgpo/*"),
           "mean over tokens"),
    Figure("KL to reference", "kl_ref.png", ("kl/ref*", "actor/kl*", "loss/kl_ref"), "KL"),
    Figure("KL to old policy", "kl_old.png", ("kl/old_*",), "KL"),
    Figure("Gradient norm", "grad_norm.png", ("train/grad_norm", "actor/grad_norm"), "norm"),
    Figure("Policy loss", "loss.png", ("loss/policy", "loss/total", "loss/entropy_bonus"),
           "loss"),
    Figure("Response length", "response_length.png",
           ("response/length*", "response/*_length*"), "tokens"),
    Figure("Truncated responses", "truncation.png", ("response/truncat*",), "fraction"),
    Figure("Policy-loss regions", "regions.png", ("region/*",), "token fraction"),
    Figure("Gradient weight per region", "grad_weight.png", ("grad_weight/*",), "mean F"),
    Figure("Clip fractions", "clip.png",
           ("clip/*", "actor/clip*", "dppo/masked_frac", "abc/*_frac"), "token fraction"),
    Figure("Importance ratio", "ratio.png", ("ratio/*", "seq_ratio/*"), "pi / pi_old"),
    Figure("Train vs rollout mismatch", "mismatch.png",
           ("rollout/logp_abs_diff_*", "rollout/k3_kl"), "|logp diff|, k3 KL"),
    Figure("Router replay disagreement", "router_replay.png",
           ("router/replay_disagreement", "router/train_replay_disagreement"), "fraction"),
)

Series = dict[str, tuple[list[int], list[float]]]


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """``{step: {name: value}}`` of the finite numeric values in a metrics.jsonl."""
    if not path.is_file():
        raise UserError(f"{path} not found: pass a run directory whose logging sinks include jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    steps: dict[int, dict[str, float]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            if i == last:  # a run killed mid-write
                continue
            raise UserError(
                f"{path}:{i + 1} is not a metrics record with a step: fix or delete that line"
            ) from None
        values = {k: float(v) for k, v in record.items()
                  if k not in ("step", "time") and _is_number(v) and math.isfinite(v)}
        steps.setdefault(step, {}).update(values)
    if not steps:
        raise UserError(f"{path} holds no metrics: run at least one training step first")
    return steps


def write_report(run_dir: Path) -> list[Path]:
    """Plot ``run_dir/metrics.jsonl`` into ``run_dir/report/*.png``; returns the files written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure as MplFigure
    except ImportError:
        raise UserError("the report needs matplotlib: pip install matplotlib") from None

    run_dir = Path(run_dir)
    steps = read_metrics(run_dir / "metrics.jsonl")
    names = sorted({name for values in steps.values() for name in values})
    out_dir = run_dir / "report"
    written: list[Path] = []
    for spec in FIGURES:
        keys = matching(names, spec.patterns)
        if not keys:
            continue
        series = _series(steps, keys)
        fig = MplFigure(figsize=(7.0, 4.0), layout="constrained")
        FigureCanvasAgg(fig)  # explicit Agg: no pyplot, no global backend switch
        ax = fig.add_subplot()
        for key, (xs, ys) in series.items():
            ax.plot(xs, ys, label=key, marker="o" if len(xs) <= 30 else None, markersize=3,
                    linewidth=1.2)
        ax.set_title(spec.title)
        ax.set_xlabel("step")
        ax.set_ylabel(spec.ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", ncols=1 + len(series) // 8)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / spec.filename
        fig.savefig(path, dpi=120)
        written.append(path)
    return written


def matching(names: list[str], patterns: tuple[str, ...]) -> list[str]:
    """Names matching any pattern, in pattern order (sorted within a pattern), each once."""
    out: list[str] = []
    for pattern in patterns:
        out += [n for n in names if fnmatchcase(n, pattern) and n not in out]
    return out


def _series(steps: dict[int, dict[str, float]], keys: list[str]) -> Series:
    series: Series = {}
    for key in keys:
        xs = [s for s in sorted(steps) if key in steps[s]]
        series[key] = (xs, [steps[s][key] for s in xs])
    return series


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
