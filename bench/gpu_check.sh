#!/usr/bin/env bash
# gradmon's GPU checks as one command for a lent H100/H200 (no network there); ~3 minutes,
# 5 at most (each stage has its own timeout).
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from anywhere in the repo
#   bash bench/gpu_check.sh --fetch-wheels  # beforehand, on a machine with network
#   bash bench/gpu_check.sh --dry-run       # on any machine (CPU): every stage's command
#                                           # resolves: imports, test collection, bench CLI
#
# The GPU image has torch and triton but not pydantic, which `import gradmon` needs.
# --fetch-wheels downloads the wheels of gradmon's pure-Python needs for that machine's
# Python 3.12 into .whl/ (make git ignore it: `echo /.whl/ >> .git/info/exclude`, and
# name `.whl` in the device call's `carry`); the check installs them into /tmp, never over
# the image's own packages. gradmon itself runs from this checkout (PYTHONPATH), not
# installed: the C extension built here is for another Python and is simply not used.
#
# Stages, each logged to $OUT/<stage>.log ($OUT defaults to ./gpu_out):
#   env    versions, the GPU, and that gradmon, torch and triton import
#   tests  pytest -m gpu tests/test_cuda.py: the Triton kernel against the float64 reference
#          on CUDA tensors (all dtypes, NaN/Inf, chunk boundaries, unaligned views, 1e8 and
#          >2**31 elements) and training steps with the agent attached under
#          torch.cuda.set_sync_debug_mode("error"), once more with
#          collect.update_ratio_every: 1 and a budget forcing round-robin chunks (no sync,
#          pooled pinned buffers reused, ratio against float64; a few seconds more)
#   bench  bench/gpu_bench.py: GB/s against a device copy and time against _foreach_norm on
#          GPT-2-small- and 1.3B-shaped grads, a kernel config sweep, step overhead on a
#          GPT-2-small-shaped model, syncs per step -> $OUT/gpu_bench.json
# A failed stage does not stop the next; the exit status is 0 only when all passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="${GRADMON_WHEELS:-$ROOT/.whl}"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # The versions this machine has, as wheels for the GPU machine's CPython 3.12.
    # typing-extensions too: pydantic-core needs >= 4.14.1, the image's may be older.
    read -r PYD PYD_CORE AT TI TE < <("$PY" -c '
import importlib.metadata as m
names = "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"
print(*(m.version(n) for n in names))')
    mkdir -p "$WHEELS"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" \
        "pydantic==$PYD" "pydantic-core==$PYD_CORE" "annotated-types==$AT" \
        "typing-inspection==$TI" "typing-extensions==$TE"
    ls -la "$WHEELS"
    exit 0
fi

if [[ "${1:-}" == "--dry-run" ]]; then
    # What a move of files can break, checked without a GPU (tests/test_gpu_check.py runs
    # this in CI): gradmon and its stats backends import from this checkout, the GPU tests
    # are collected, and the bench script parses its arguments.
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    set -x
    "$PY" -c 'import gradmon, gradmon.stats, gradmon.stats.torch, gradmon.stats.reference'
    "$PY" -m pytest -m gpu tests/test_cuda.py --collect-only -q -p no:cacheprovider >/dev/null
    "$PY" bench/gpu_bench.py --help >/dev/null
    set +x
    echo "gpu_check --dry-run: ok (stages env, tests, bench resolve on this checkout)"
    exit 0
fi

OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the GPU tests need compiled kernels

if ! "$PY" -c "import pydantic" 2>/dev/null; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "installing $(ls "$WHEELS" | tr '\n' ' ')into /tmp/gradmon-site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target /tmp/gradmon-site "$WHEELS"/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/gradmon-site"
    else
        echo "pydantic is missing and $WHEELS holds no wheels:" \
            "run 'bash bench/gpu_check.sh --fetch-wheels' where there is network" >&2
    fi
fi

failed=()
stage() {  # stage NAME SECONDS CMD...
    local name=$1 limit=$2 start=$SECONDS rc=0
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    if ((rc == 0)); then
        echo "=== $name: ok in $((SECONDS - start))s"
    else
        ((rc == 124)) && echo "=== $name: TIMED OUT after ${limit}s"
        echo "=== $name: FAILED (exit $rc) in $((SECONDS - start))s"
        failed+=("$name")
    fi
}

stage env 60 "$PY" -c '
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "no CUDA device visible to torch"
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
import triton
print("triton", triton.__version__)
import gradmon
from gradmon.stats import triton as tb
assert not tb.interpreting()
print("gradmon", gradmon.__version__, "from", gradmon.__file__)
'
if [[ " ${failed[*]} " == *" env "* ]]; then
    echo "environment not usable; nothing else can run" >&2
    exit 1
fi

stage tests 120 "$PY" -m pytest -m gpu tests/test_cuda.py -q -ra -p no:cacheprovider \
    --junitxml="$OUT/tests.xml"
stage bench 150 "$PY" bench/gpu_bench.py --json "$OUT/gpu_bench.json"

if ((${#failed[@]})); then
    echo "gpu_check: FAILED stages: ${failed[*]} (logs in $OUT)"
    exit 1
fi
echo "gpu_check: all stages passed (logs and gpu_bench.json in $OUT)"
