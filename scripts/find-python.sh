# Sourced by scripts/setup.sh and scripts/setup-vllm-cpu.sh: find a Python >= 3.12.
# shellcheck shell=bash

is_ok() {  # a runnable interpreter, version >= 3.12
    [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1
}

find_python() {  # PYTHON, python3.12 on PATH, pyenv's 3.12, then python3 if recent enough
    local candidates=("${PYTHON:-}" python3.12)
    if command -v pyenv >/dev/null 2>&1; then
        local root
        root="$(pyenv root)"
        candidates+=("$root"/versions/3.12*/bin/python)
    fi
    candidates+=(python3)
    for c in "${candidates[@]}"; do
        if is_ok "$c"; then
            echo "$c"
            return 0
        fi
    done
    return 1
}
