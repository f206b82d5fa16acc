"""The side-by-side report of a comparison (`megarl.compare`): ``write_comparison(OUT)``.

For every metric the single-run report draws (`megarl.report.FIGURES`: reward, eval avg@k and
pass@k, entropy, KL to the old policy and to the reference, regions, clipping, gradient weights,
gradient norm, and the per-loss extras such as UP's ``up/cap_*``), one PNG with one line per
objective: the mean over its seeds at each step, and a band from the lowest to the highest seed.
``OUT/report/summary.md`` is the table of final values (eval: avg@1 and the largest k of pass@k
and maj@k), mean +- standard deviation over seeds:
a training metric averaged over the last tenth of the steps, an eval metric at its last
evaluation.

Runs are found on disk (``OUT/<loss>/seed<k>/metrics.jsonl``), so a comparison run elsewhere (one
Slurm job per pair) reports the same way once its run directories are here.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from megarl.compare import MANIFEST
from megarl.errors import UserError
from megarl.report import FIGURES, matching, read_metrics

# the columns of summary.md, in order (fnmatch patterns; a column shows when a run logs it)
TABLE = ("reward/mean", "eval/mean/greedy@1", "eval/mean/avg@1", "eval/mean/pass@*",
         "eval/mean/maj@*",
         "reward/distinct_correct", "response/distinct_answers_frac", "entropy/mean", "kl/ref_mean",
         "kl/old_k3", "clip/frac", "up/cap_pos", "train/grad_norm", "response/length_mean")

Runs = dict[str, dict[int, dict[int, dict[str, float]]]]  # loss -> seed -> step -> metrics


def find_runs(out: Path) -> Runs:
    """``{loss: {seed: metrics by step}}`` of every ``OUT/<loss>/seed<k>/metrics.jsonl``."""
    runs: Runs = {}
    for path in sorted(Path(out).glob("*/seed*/metrics.jsonl")):
        match = re.fullmatch(r"seed(-?\d+)", path.parent.name)
        if match is None:
            continue
        runs.setdefault(path.parent.parent.name, {})[int(match.group(1))] = read_metrics(path)
    if not runs:
        raise UserError(f"{out} holds no runs (OUT/<loss>/seed<k>/metrics.jsonl): run "
                        "megarl compare first")
    return runs


def metric_names(runs: Runs) -> list[str]:
    """Every metric any run logged, sorted."""
    return sorted({n for seeds in runs.values() for steps in seeds.values()
                   for values in steps.values() for n in values})


def final_value(steps: dict[int, dict[str, float]], name: str) -> float | None:
    """An eval metric at its last evaluation; any other the mean of its last tenth of steps."""
    logged = [s for s in sorted(steps) if name in steps[s]]
    if not logged:
        return None
    if name.startswith("eval/"):
        return steps[logged[-1]][name]
    tail = logged[-max(1, len(logged) // 10):]
    return sum(steps[s][name] for s in tail) / len(tail)


def summary_table(runs: Runs) -> str:
    """Markdown: one row per objective, final values as mean +- std over its seeds."""
    columns = _largest_k(matching(metric_names(runs), TABLE))
    header = ["objective", "seeds", "steps", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for loss, seeds in runs.items():
        cells = [loss, str(len(seeds)), "/".join(str(max(s)) for s in seeds.values())]
        for column in columns:
            values = [v for steps in seeds.values()
                      if (v := final_value(steps, column)) is not None]
            cells.append(_mean_std(values))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _largest_k(columns: list[str]) -> list[str]:
    """Of ``X@k`` columns only avg@1 and the largest k (pass@8, not pass@1 .. pass@8)."""

    def split(column: str) -> tuple[str, int | None]:
        stem, _, k = column.rpartition("@")
        return (stem, int(k)) if stem and k.isdigit() else (column, None)

    largest: dict[str, int] = {}
    for stem, k in map(split, columns):
        if k is not None:
            largest[stem] = max(largest.get(stem, 0), k)
    return [c for c in columns
            if split(c)[1] in (None, largest.get(split(c)[0])) or c.endswith("avg@1")]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4g} +- {spread:.2g}"


def band(seeds: dict[int, dict[int, dict[str, float]]], name: str,
         ) -> tuple[list[int], list[float], list[float], list[float]]:  # fmt: skip
    """Steps where every seed logged `name`, with the mean, minimum and maximum over seeds."""
    common = sorted(set.intersection(*({s for s, v in steps.items() if name in v}
                                       for steps in seeds.values())))
    values = [[steps[s][name] for steps in seeds.values()] for s in common]
    return (common, [sum(v) / len(v) for v in values], [min(v) for v in values],
            [max(v) for v in values])


def write_comparison(out: Path) -> list[Path]:
    """``OUT/report/*.png`` (one per metric, objectives side by side) and ``summary.md``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure as MplFigure
    except ImportError:
        raise UserError("the report needs matplotlib: pip install matplotlib") from None

    out = Path(out)
    runs = find_runs(out)
    names = metric_names(runs)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for spec in FIGURES:
        for name in matching(names, spec.patterns):
            fig = MplFigure(figsize=(7.0, 4.0), layout="constrained")
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            drawn = 0
            for loss, seeds in runs.items():
                if not all(any(name in v for v in steps.values()) for steps in seeds.values()):
                    continue
                xs, mean, low, high = band(seeds, name)
                if not xs:
                    continue
                line, = ax.plot(xs, mean, label=f"{loss} ({len(seeds)} seeds)", linewidth=1.4,
                                marker="o" if len(xs) <= 30 else None, markersize=3)
                if len(seeds) > 1:
                    ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.18,
                                    linewidth=0)
                drawn += 1
            if not drawn:
                continue
            ax.set_title(f"{spec.title}: {name}", fontsize="medium")
            ax.set_xlabel("step")
            ax.set_ylabel(spec.ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small", title="mean; band: min..max over seeds",
                      title_fontsize="small")
            path = report / (re.sub(r"[^A-Za-z0-9@.]+", "_", name).strip("_") + ".png")
            fig.savefig(path, dpi=110)
            written.append(path)
    summary = report / "summary.md"
    summary.write_text("# Final values (mean +- std over seeds)\n\n" + summary_table(runs)
                       + "\n\nTraining metrics: the mean of the last tenth of the steps; eval "
                       "metrics: the last evaluation.\n")
    written.append(summary)
    return written


def is_comparison(path: Path) -> bool:
    """A folder of a comparison (its manifest, or ``<loss>/seed<k>`` runs and no run of its
    own), rather than one run."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return True
    return not (path / "metrics.jsonl").exists() and any(path.glob("*/seed*/metrics.jsonl"))


