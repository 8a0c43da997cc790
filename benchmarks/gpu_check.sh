#!/usr/bin/env bash
# The GPU check of issue 16, in at most 8 minutes: the CUDA tests (tests/test_cuda.py, marker
# `cuda`), then GPT-2 124M plain and looped timed by benchmarks/gpu_check.py (arguments are
# passed on to it, e.g. --json out.json, or --dry_run for the CPU check the test suite runs).
#
#   bash benchmarks/gpu_check.sh [--json gpu_check.json] [--batch_size 16]
#
# Each part runs under `timeout`; the benchmark runs even if a test failed (one device session
# then yields both), and the script's status is non-zero if either part failed or timed out.
# PYTHON picks the interpreter (default: the repository's .venv if there is one, else python3).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# 200 s + 260 s, each with 5 s to die after SIGTERM: 470 s, under the 8 minutes.
TEST_TIMEOUT_S="${GPU_CHECK_TEST_TIMEOUT_S:-200}"
BENCH_TIMEOUT_S="${GPU_CHECK_BENCH_TIMEOUT_S:-260}"

tests_rc=0
echo "== CUDA tests (pytest -m cuda tests/test_cuda.py, at most ${TEST_TIMEOUT_S} s)"
timeout --kill-after=5 "$TEST_TIMEOUT_S" \
    "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py || tests_rc=$?
if [[ $tests_rc -eq 124 ]]; then echo "CUDA tests: timed out after ${TEST_TIMEOUT_S} s"; fi

bench_rc=0
echo "== benchmark (benchmarks/gpu_check.py $*, at most ${BENCH_TIMEOUT_S} s)"
timeout --kill-after=5 "$BENCH_TIMEOUT_S" \
    "$PYTHON" benchmarks/gpu_check.py "$@" || bench_rc=$?
if [[ $bench_rc -eq 124 ]]; then
    echo "benchmark: timed out after ${BENCH_TIMEOUT_S} s (finished variants were printed)"
fi

echo "== gpu_check: tests exit ${tests_rc}, benchmark exit ${bench_rc}"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]
