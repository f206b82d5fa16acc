"""`megarl compare` (megarl/compare.py) and its side-by-side report (megarl/compare_report.py),
and the exploration testbed `toy:digitsum`: a 2-objective x 2-seed comparison of a few steps,
its report's files, resuming a half-finished comparison, and refusing to mix two."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megarl.compare import Comparison
from megarl.compare_report import band, final_value, summary_table, write_comparison
from megarl.data.toy import DigitSumTask, toy_reward, toy_task
from megarl.errors import UserError
from megarl.trainer import diversity_metrics

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = "examples/configs/quickstart.yaml"
SHORT = ("trainer.steps=2", "trainer.eval_every=2", "eval.k=2", "eval.max_problems=4",
         "checkpoint.save_every=1", "logging.sinks=[jsonl]")


def compare(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "megarl", "compare", QUICKSTART, *SHORT,
                           "--out", str(out), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("compare")
    r = compare(out, "--losses", "up_gspo,grpo", "--seeds", "2", "--jobs", "2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out, r.stdout


def test_every_pair_is_a_normal_run_and_the_report_is_written(comparison) -> None:
    out, stdout = comparison
    for loss in ("up_gspo", "grpo"):
        for seed in (1, 2):
            run = out / loss / f"seed{seed}"
            records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in records] == [1, 2]
            status = json.loads((out / loss / f"seed{seed}.status.json").read_text())
            assert status["reason"] == "finished" and status["step"] == 2
            assert (run / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    manifest = json.loads((out / "compare.json").read_text())
    assert manifest["losses"] == ["up_gspo", "grpo"] and manifest["seeds"] == [1, 2]
    report = out / "report"
    for name in ("reward_mean.png", "entropy_mean.png", "eval_mean_pass@2.png",
                 "kl_old_k3.png", "clip_frac.png", "region_HP.png", "train_grad_norm.png",
                 "up_cap_pos.png", "reward_distinct_correct.png"):
        assert (report / name).stat().st_size > 10_000, name
        assert str(report / name) in stdout
    summary = (report / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| up_gspo")
            or line.startswith("| grpo")]
    assert len(rows) == 2 and all("| 2 | 2/2 |" in row for row in rows)
    assert "eval/mean/avg@1" in summary and "+-" in rows[0]
    # the seeds differ (they are different runs), so does the reward curve's band
    seeds = {s: json.loads((out / "grpo" / f"seed{s}" / "metrics.jsonl").read_text()
                           .splitlines()[0]) for s in (1, 2)}
    assert seeds[1]["reward/mean"] != seeds[2]["reward/mean"] or \
        seeds[1]["entropy/mean"] != seeds[2]["entropy/mean"]


def test_a_half_finished_comparison_resumes_only_what_is_missing(comparison) -> None:
    out, _ = comparison
    # one pair "killed" after its first checkpoint: its status gone, its last step not logged
    status = out / "grpo" / "seed2.status.json"
    status.unlink()
    before = {p: p.stat().st_mtime for p in out.glob("*/seed*/metrics.jsonl")}
    r = compare(out, "--losses", "up_gspo,grpo", "--seeds", "2", "--jobs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("finished before, not rerun") == 3
    assert "grpo/seed2: started" in r.stdout and "grpo/seed2: finished" in r.stdout
    assert json.loads(status.read_text())["reason"] == "finished"
    for path, mtime in before.items():  # the finished pairs were left alone
        if "grpo/seed2" not in str(path):
            assert path.stat().st_mtime == mtime


def test_another_comparison_into_the_same_folder_is_refused(comparison) -> None:
    out, _ = comparison
    r = compare(out, "--losses", "grpo", "--seeds", "1", "trainer.lr=0.1")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "holds another comparison" in r.stderr
    assert r.stderr.count("\n") == 1


def test_print_commands_gives_one_train_command_per_unfinished_pair(tmp_path: Path) -> None:
    r = compare(tmp_path, "--losses", "up_gspo,gspo,grpo", "--seeds", "3", "--print-commands")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 9
    assert all(" -m megarl train " in line and "MEGARL_STOP_STATUS=" in line for line in lines)
    assert "algo.loss=gspo trainer.seed=3" in lines[5]  # loss by loss, seed by seed
    assert not (tmp_path / "compare.json").exists()  # printing runs nothing, writes nothing
    r = compare(tmp_path, "--losses", "gspo", "--seeds", "2", "--print-commands", "--sbatch",
                "slurm/gspo_30b.sh")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout.splitlines()[1]) == [
        "sbatch", "slurm/gspo_30b.sh", *SHORT, "algo.loss=gspo", "trainer.seed=2",
        f"logging.dir={tmp_path}/gspo", "logging.run_name=seed2"]


def test_a_folder_of_seed_runs_reports_as_a_comparison(comparison, tmp_path: Path) -> None:
    """Runs made elsewhere (one cluster job per pair) and copied here: no manifest needed."""
    import shutil

    out, _ = comparison
    for loss in ("up_gspo", "grpo"):
        shutil.copytree(out / loss / "seed1", tmp_path / loss / "seed1")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "megarl", "report", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "report" / "summary.md").is_file()
    assert "| up_gspo | 1 | 2 |" in (tmp_path / "report" / "summary.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--losses", "grpo,grpo"), "listed twice"),
        (("--losses", "grpo", "--seeds", "0"), "--seeds=0"),
        (("--losses", "nope"), "algo.loss"),
        (("--losses", "grpo", "algo.loss=dapo"), "sets algo.loss for each pair"),
    ],
)
def test_bad_comparisons_are_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    r = compare(tmp_path, *args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "compare.json").exists()


def test_comparison_pairs_and_overrides() -> None:
    c = Comparison.make("base.yaml", ["trainer.steps=5"], "a, b", 2, 7, "out")
    assert [p.name for p in c.pairs()] == ["a/seed7", "a/seed8", "b/seed7", "b/seed8"]
    assert c.pair_overrides(c.pairs()[1]) == [
        "trainer.steps=5", "algo.loss=a", "trainer.seed=8", "logging.dir=out/a",
        "logging.run_name=seed8"]
    with pytest.raises(UserError, match="--losses"):
        Comparison.make("base.yaml", [], " , ", 1, 0, "out")


def test_final_values_and_bands() -> None:
    steps = {s: {"reward/mean": float(s), "eval/mean/avg@1": 0.5} for s in range(1, 21)}
    steps[20]["eval/mean/avg@1"] = 0.75
    assert final_value(steps, "reward/mean") == pytest.approx(19.5)  # the last tenth: 19, 20
    assert final_value(steps, "eval/mean/avg@1") == 0.75  # the last evaluation
    assert final_value(steps, "entropy/mean") is None
    seeds = {1: {1: {"x": 1.0}, 2: {"x": 3.0}}, 2: {1: {"x": 3.0}}}
    assert band(seeds, "x") == ([1], [2.0], [1.0], [3.0])  # only steps every seed logged
    table = summary_table({"grpo": {1: steps, 2: steps}})
    assert "| grpo | 2 | 20/20 | 19.5 +- 0 | 0.75 +- 0 |" in table


def test_an_empty_folder_has_no_report(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="holds no runs"):
        write_comparison(tmp_path)


# ---- the exploration testbed ----------------------------------------------------------------

def test_digitsum_has_many_answers_and_grades_each() -> None:
    task = toy_task("toy:digitsum")
    assert isinstance(task, DigitSumTask)
    answers = task.answers(3)
    assert set(answers) == {"12", "21", "30", "102", "111", "120", "201", "210", "300"}
    assert len(task.answers(12)) == 73
    problems = [task.problem(0, i) for i in range(200)]
    assert {p.prompt for p in problems} == {f"{s}=" for s in range(3, 13)}
    assert problems[5] == task.problem(0, 5)  # a pure function of (seed, index)
    p = problems[0]
    total = int(p.prompt[:-1])
    for answer in p.answer:
        assert sum(map(int, answer)) == total and 2 <= len(answer) <= 3
        assert toy_reward(answer, p.answer) == 1.0
    assert toy_reward("5", p.answer) == 0.0 and toy_reward("1000", p.answer) == 0.0


def test_diversity_metrics_count_distinct_and_distinct_correct() -> None:
    groups = [(["3", "3", "4", None], [1.0, 1.0, 1.0, 0.0]), (["6"] * 4, [0.0] * 4)]
    m = diversity_metrics(groups)
    assert m["response/distinct_answers_frac"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert m["reward/distinct_correct"] == pytest.approx((2 + 0) / 2)
