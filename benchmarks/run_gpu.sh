#!/usr/bin/env bash
# The GPU benchmarks of issue 8 in one command, for the device machine (one H100 or H200).
#
#   bash benchmarks/run_gpu.sh [NAME ...]    NAME: cuda_parity train_step weight_sync experts
#                                            logprobs (default: each one present in benchmarks/)
#
# 1. install: megatron-core is not in the device image; its wheel travels in .whl/ (fetch it
#    once with `bash benchmarks/fetch_wheels.sh` where PyPI is reachable, and name ".whl" in the
#    run call's carry) and is installed with --target into $SITE (default /tmp/megarl-site).
# 2. check: nvidia-smi, the imports and versions, a bf16 matmul on the GPU, then each chosen
#    benchmark's --smoke (tiny shapes, the same code paths) on the GPU. A benchmark whose smoke
#    run fails is not run in full.
# 3. run: each benchmark in full, within what is left of $BUDGET_S seconds (default 570, inside
#    the device tool's 10-minute call); one that would start with less than $MIN_LEFT_S left
#    (default 60) is skipped and named. CHECK=0 skips the smoke runs.
# 4. tables: every benchmark's table, again, at the end.
# ALLOW_CPU=1 lets the environment check pass without a GPU and SMOKE_ONLY=1 stops after the
# check phase; EXTRA_ARGS are added to every full run (EXTRA_ARGS=--smoke: a dry run of the
# whole script on a CPU machine).
#
# Results: with $OUT set (the device machine), $OUT/<name>.json and $OUT/run_gpu.log (these come
# back; copy them to benchmarks/results/<name>-<date>.json and commit); without it,
# benchmarks/results/<name>-<date>.json. Exit status: 0 when every benchmark ran and passed.
# Example device call (two calls keep each well inside 10 minutes):
#   run(command="bash benchmarks/run_gpu.sh cuda_parity weight_sync", carry=[".whl"])
#   run(command="bash benchmarks/run_gpu.sh train_step experts logprobs", carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/megarl-site}
BUDGET_S=${BUDGET_S:-570}
MIN_LEFT_S=${MIN_LEFT_S:-60}
CHECK=${CHECK:-1}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
ORDER=(cuda_parity train_step weight_sync experts logprobs)

if [ $# -gt 0 ]; then NAMES=("$@"); else
  NAMES=(); for n in "${ORDER[@]}"; do [ -f "benchmarks/$n.py" ] && NAMES+=("$n"); done
fi
for n in "${NAMES[@]}"; do
  [ -f "benchmarks/$n.py" ] || { echo "no benchmarks/$n.py (have: ${ORDER[*]})"; exit 2; }
done

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"; DEST=$OUT; LOG=$OUT/run_gpu.log
else
  DEST=$ROOT/benchmarks/results; mkdir -p "$DEST"; LOG=$(mktemp /tmp/run_gpu.XXXXXX.log)
fi
WORK=$(mktemp -d /tmp/run_gpu.XXXXXX)
exec > >(tee -a "$LOG") 2>&1
say() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }

say "install"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  shopt -s nullglob; wheels=(.whl/*.whl); shopt -u nullglob
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "megatron-core is not installed and .whl/ holds no wheel: run 'bash benchmarks/fetch_wheels.sh' where PyPI is reachable and carry .whl"
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" || exit 2
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi

say "check: environment"
nvidia-smi -L || echo "nvidia-smi failed"
"$PY" - <<'EOF' || { echo "environment check failed"; exit 2; }
import importlib.metadata as md, torch
import megatron.core  # noqa: F401  (the carried wheel)
import transformers
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print("torch", torch.__version__, "cuda", torch.version.cuda, "| megatron-core", v("megatron-core"),
      "| transformers", transformers.__version__, "| triton", v("triton"),
      "| transformer-engine", v("transformer-engine"))
import os
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(0),
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = (a @ a).float()
    torch.cuda.synchronize()
    assert torch.isfinite(b).all(), "bf16 matmul gave non-finite values"
else:
    assert os.environ.get("ALLOW_CPU") == "1", "no CUDA device visible (ALLOW_CPU=1 for a dry run)"
    print("no GPU: a CPU dry run")
EOF

declare -A STATUS HELP
for n in "${NAMES[@]}"; do HELP[$n]=$("$PY" "benchmarks/$n.py" --help 2>/dev/null); done
helps() { grep -q -- "$2" <<<"${HELP[$1]}"; }
if [ "$CHECK" != 0 ]; then
  for n in "${NAMES[@]}"; do
    say "check: $n --smoke"
    if ! helps "$n" --smoke; then STATUS[$n]="no --smoke"; continue; fi
    args=(--smoke); helps "$n" --out && args+=(--out "$WORK/$n-smoke.json")
    if timeout 300 "$PY" "benchmarks/$n.py" "${args[@]}"; then STATUS[$n]="smoke ok"
    else STATUS[$n]="SMOKE FAILED (exit $?)"; fi
  done
fi

if [ "${SMOKE_ONLY:-0}" = 1 ]; then
  for n in "${NAMES[@]}"; do echo "$n: ${STATUS[$n]:-not checked}"; done
  for n in "${NAMES[@]}"; do [ "${STATUS[$n]:-}" = "smoke ok" ] || exit 1; done
  exit 0
fi

ran=()
for n in "${NAMES[@]}"; do
  case "${STATUS[$n]:-}" in SMOKE*) say "run: $n skipped (its smoke run failed)"; continue;; esac
  left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt "$MIN_LEFT_S" ]; then
    say "run: $n skipped: ${left}s of the ${BUDGET_S}s budget left"; STATUS[$n]="skipped (time)"; continue
  fi
  say "run: $n (at most $((left - 10))s)"
  read -r -a args <<<"${EXTRA_ARGS:-}"; out=$DEST/$n.json
  [ -z "${OUT:-}" ] && out=$DEST/$n-$(date -u +%F).json
  helps "$n" --out && args+=(--out "$out")
  timeout $((left - 10)) "$PY" "benchmarks/$n.py" "${args[@]}" 2>&1 | tee "$WORK/$n.log"
  code=${PIPESTATUS[0]}
  case $code in
    0) STATUS[$n]="passed";;
    124) STATUS[$n]="TIMED OUT";;
    *) STATUS[$n]="FAILED (exit $code)";;
  esac
  ran+=("$n:$out")
done

say "tables"
for item in "${ran[@]}"; do
  n=${item%%:*}; out=${item#*:}
  echo; echo "---- $n: ${STATUS[$n]}"
  if [ -f "$out" ] && "$PY" -c "import json,sys; t=json.load(open(sys.argv[1])).get('table'); print(t) if t else sys.exit(1)" "$out"; then :
  else tail -n 30 "$WORK/$n.log"; fi
done
echo
ok=0
for n in "${NAMES[@]}"; do
  echo "$n: ${STATUS[$n]:-not run}"
  [ "${STATUS[$n]:-}" = passed ] || ok=1
done
echo "results in $DEST; log $LOG"
exit $ok
