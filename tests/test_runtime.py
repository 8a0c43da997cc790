"""Tests for blockloop.runtime's dtype choice and the reason the training log gives for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockloop.runtime import cpu_has_bf16_units, dtype_reason, resolve_dtype


def test_auto_is_float32_on_cpu_whatever_the_cpu_has():
    assert resolve_dtype("auto", "cpu") == "float32"
    reason = dtype_reason("auto", "cpu")
    assert reason.startswith("auto: float32 on CPU")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    has = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_bf16_units() is has
    assert ("this CPU has bf16 units" in reason) is has
    assert ("this CPU lacks bf16 units" in reason) is (not has)


def test_a_dtype_that_was_asked_for_is_used_as_set():
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert dtype_reason("bfloat16", "cpu") == "as set"
