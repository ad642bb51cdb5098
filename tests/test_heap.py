"""serving.heap: the serving processes' memory hygiene (gc freeze, glibc heap retention)."""
from __future__ import annotations

import ctypes
import gc
import sys

import pytest

from hubdeploy.serving.heap import freeze_heap, retain_freed_memory


def test_freeze_heap_moves_live_objects_out_of_collections() -> None:
    keep = [object() for _ in range(1000)]
    try:
        n = freeze_heap()
        assert n == gc.get_freeze_count() and n > len(keep)
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_retain_freed_memory_serves_megabyte_blocks_from_the_heap() -> None:
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    assert retain_freed_memory() is True
    before = libc.mallinfo2().hblks
    p = libc.malloc(8 << 20)  # 8 MB: mmap'ed under glibc's default threshold (128 KB)
    try:
        assert libc.mallinfo2().hblks == before  # from the heap, not a fresh mapping
    finally:
        libc.free(p)
