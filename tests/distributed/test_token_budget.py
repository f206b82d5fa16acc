"""Token-budget micro-batches give the fixed-count run's log-probs, loss and gradients, in DP2,
PP2 and PP2 x VPP2 on CPU (tests/distributed/token_budget_cases.py, through the real `Policy`):
the sequences are spread over the DP ranks by tokens, no row exceeds the budget unless one
sequence does, every rank runs the same number of micro-batches, and a rank with fewer rows
pads with empty ones that train nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("token_budget_cases.py")
LAYOUTS = ("dp2", "pp2", "pp2vpp2")
BUDGETS = (24, 64, 200)


def test_token_budget_equals_fixed_count_in_every_layout() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPT), *LAYOUTS], capture_output=True, text=True, timeout=600, env=env)
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.startswith("CASE ")]
    for layout in LAYOUTS:
        for budget in BUDGETS:
            hits = [line for line in lines if line.split()[1:3] == [layout, f"budget{budget}"]]
            assert hits and all(line.split()[3] == "PASS" for line in hits), \
                f"{layout} budget{budget}:\n" + "\n".join(lines) + output[-3000:]
    assert proc.returncode == 0, output[-6000:]
    # the long-tailed batch: under DP2 the smallest budget leaves one rank a single sequence,
    # so it pads; the largest budget packs each rank's share into one row
    dp2 = {line.split()[2]: line for line in lines if line.split()[1] == "dp2"}
    assert int(re.search(r"padding_rows=(\d+)", dp2["budget24"]).group(1)) > 0
    assert "micro_batches=[1, 1]" in dp2["budget200"]
    for line in dp2.values():  # 120 tokens each (the long sequence alone, the 15 short ones)
        imbalance = float(re.search(r"'batch/dp_imbalance': ([0-9.]+)", line).group(1))
        assert imbalance < 1.05, line
    # the interleaved schedule wants a multiple of pp micro-batches: PP2 packs 3 rows at 64
    # tokens, PP2 x VPP2 splits the fullest of them in two
    pp2 = {line.split()[2]: line for line in lines if line.split()[1] == "pp2"}
    vpp = {line.split()[2]: line for line in lines if line.split()[1] == "pp2vpp2"}
    assert "micro_batches=[3, 3]" in pp2["budget64"]
    assert "micro_batches=[4, 4]" in vpp["budget64"]
