"""Tests for blockloop.runtime's dtype choice and the reason the training log gives for it, and
for the CPU allocator setting."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys
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


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (malloc.h, glibc >= 2.33): every field a size_t.
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mmapped_blocks_after_malloc(nbytes: int) -> int:
    """glibc's count of mmap-served blocks while one `nbytes` block is allocated."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.mallinfo2.restype = _MallInfo2
    before = libc.mallinfo2().hblks
    block = libc.malloc(nbytes)
    try:
        return libc.mallinfo2().hblks - before
    finally:
        libc.free(block)


def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    # Runs in a fresh interpreter: the setting is process-wide, and glibc's own threshold moves
    # up after large frees, so only a clean process shows the default.
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from tests.test_runtime import _mmapped_blocks_after_malloc as m;"
        "from blockloop.runtime import keep_freed_memory as k;"
        "print(m(64 << 20), k(), m(64 << 20))"
    )
    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout.split()
    assert out == ["1", "True", "0"]
