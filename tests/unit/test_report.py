"""write_report: one valid PNG per figure whose metrics were logged, and clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from megarl.errors import UserError
from megarl.metrics import JsonlSink
from megarl.report import FIGURES, matching, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, steps: int = 12) -> None:
    sink = JsonlSink(run_dir / "metrics.jsonl")
    for step in range(steps):
        metrics = {
            "reward/mean": 0.3 + 0.02 * step,
            "entropy/mean": 0.6 - 0.01 * step,
            "train/grad_norm": math.inf if step == 3 else 1.0 / (1 + step),  # logged as null
            "region/LN": 0.01, "region/HP": 0.02, "region/LP": 0.1, "region/HN": 0.1,
            "region/M": 0.77,
            "clip/frac": 0.03, "clip/zero_grad_frac": 0.2,
            "rollout/logp_abs_diff_mean": 0.01, "rollout/k3_kl": 1e-4,
            "count/tokens": 1000.0,
        }
        if step % 4 == 0:
            metrics["eval/aime24/avg@16"] = 0.1 + 0.01 * step
            metrics["eval/mean/avg@16"] = 0.2 + 0.01 * step
        sink.log(step, metrics)
    sink.close()


def test_writes_valid_pngs_only_for_logged_groups(tmp_path: Path) -> None:
    write_run(tmp_path)
    paths = write_report(tmp_path)
    names = {p.name for p in paths}
    assert names == {"reward.png", "entropy.png", "grad_norm.png", "regions.png", "clip.png",
                     "mismatch.png"}
    for path in paths:
        assert path.parent == tmp_path / "report"
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 0 and image.shape[1] > 0
    on_disk = {p.name for p in (tmp_path / "report").iterdir()}
    assert on_disk == names  # e.g. no kl_ref.png, router_replay.png: nothing logged for them


def test_nulls_skipped_and_last_record_per_step_wins(tmp_path: Path) -> None:
    write_run(tmp_path, steps=5)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "time": 0.0, "reward/mean": 9.0, "note": "x"}) + "\n")
        f.write('{"step": 5, "reward/m')  # killed mid-write
    steps = read_metrics(tmp_path / "metrics.jsonl")
    assert sorted(steps) == [0, 1, 2, 3, 4]
    assert "train/grad_norm" not in steps[3]
    assert steps[4]["reward/mean"] == 9.0 and "note" not in steps[4]
    assert "time" not in steps[0]


def test_missing_empty_or_corrupt_metrics_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no metrics"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('garbage\n{"step": 1, "reward/mean": 1.0}\n')
    with pytest.raises(UserError, match=":1 "):
        write_report(tmp_path)


def test_figure_table_is_well_formed() -> None:
    filenames = [f.filename for f in FIGURES]
    assert len(filenames) == len(set(filenames))
    assert all(f.filename.endswith(".png") and f.patterns for f in FIGURES)
    names = ["region/HP", "region/LN", "clip/frac", "eval/aime/avg@16", "eval/aime/pass@16"]
    assert matching(names, ("region/*",)) == ["region/HP", "region/LN"]
    assert matching(names, ("eval/*/avg@*", "eval/*")) == ["eval/aime/avg@16",
                                                           "eval/aime/pass@16"]
