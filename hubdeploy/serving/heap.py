"""Memory hygiene for serving processes: no collector pauses, no page faults per step.

`freeze_heap` keeps Python's cyclic garbage collector off the serving path. A server process holds a large, long-lived heap (torch, the model, the tokenizer, FastAPI):
about 200,000 tracked objects in the front end alone, where one full collection takes tens of
milliseconds on this project's CPU box, stalling every stream at once while it runs (a traced
32-way benchmark showed one such front-end stall with no HTTP event and no engine step, most
likely that; it did not recur after the freeze: benchmarks/RESULTS.md, "Serving vs peers (CPU):
where a 32-way run went"). `freeze_heap` collects once after start-up and moves what
is alive then into the permanent generation (`gc.freeze`), so later collections scan only
what requests create. vLLM does the same after its engine starts.

`retain_freed_memory` keeps glibc from unmapping and re-faulting the large temporaries of
every CPU step (see its docstring).
"""
from __future__ import annotations

import ctypes
import gc
import sys


def freeze_heap() -> int:
    """Collect, then exempt every object alive now from future collections; returns how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _glibc(name: str):  # noqa: ANN202 - a ctypes function
    """`name` from glibc, or None where this is not glibc (other OS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """glibc: hand the heap's free pages back to the kernel (`malloc_trim(0)`).

    Called once after loading: repacking weights (AWQ into the CPU int4 layout) leaves hundreds
    of MB of freed temporaries in the heap that glibc would otherwise keep resident. Returns
    False where this is not glibc."""
    malloc_trim = _glibc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30,
                        top_pad: int = 64 << 20) -> bool:
    """glibc: serve blocks up to `mmap_threshold` from the heap and keep up to `trim_threshold`
    of freed memory in the process instead of handing it back to the kernel.

    A CPU prefill step makes hundreds of MB-sized temporaries. By default glibc maps each one
    fresh (`mmap`) and unmaps it when freed, so every step pays page faults on memory it just
    gave back: with these settings a 2048-token prefill step of the benchmark model got markedly
    faster in bf16 and fp32, decode steps unchanged (benchmarks/RESULTS.md, "Serving vs peers
    (CPU): where a 32-way run went"). The price is
    resident memory the process keeps after a peak (at most `trim_threshold` above what it
    uses). vLLM's CPU guide gets the same from preloading tcmalloc. Returns False where this
    is not glibc (nothing changed)."""
    mallopt = _glibc("mallopt")
    return mallopt is not None and all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                                (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad)))
