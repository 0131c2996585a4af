"""Bounds on the native memory a long-running process (a server, a Ray worker) keeps as it sees
ever-new input shapes.

Measured on all-MiniLM-L6-v2 (`Embedder.encode` of 1-32 texts of 1-40 words, 300 calls of new random
shapes, 1 thread, Zen 4, docs/serve.md "Memory"): the process grew 540 MiB with nothing set. Three
native caches / allocators keep something per new shape, none of them a leak of fastlm's:

- oneDNN's primitive cache: one primitive (its JIT kernel and descriptors) per new GEMM shape, up to
  ONEDNN_PRIMITIVE_CACHE_CAPACITY (default 1024) of them;
- torch's ideep LRU cache of oneDNN computations (the mkldnn linear ops), up to LRU_CACHE_CAPACITY
  (default 1024);
- glibc's malloc, which keeps freed blocks of ever-new sizes in its arenas (its mmap threshold grows
  after large frees, so big activations land on the heap and stay).

Both caches read their variable once, when oneDNN / ideep first create a primitive: `bound_caches()`
(run when this module is imported, by `import fastlm`) sets them where the environment leaves them
unset, before any model runs. The encoders also pad their packed token count to a bounded set of
sizes (`bucket_rows`, fastlm/models/bert.py), so the capped caches hit instead of re-creating
primitives per request. Growth over the 300 calls above (after 30 warm-up calls; machine loaded):

| setting | growth |
| --- | --- |
| nothing (oneDNN's and ideep's default 1024 entries, no buckets) | 540 MiB |
| glibc settings (`malloc_settings`) only | 393 MiB |
| both caches at 256, no buckets (they fill: ~1 MiB per GEMM shape in the two) | 241 MiB |
| both caches at 16, no buckets (every call re-creates its primitives) | 12-21 MiB |
| both caches at 16 and glibc settings | 2 MiB |
| both caches at 256 and buckets (the default; bounded by the ~40 buckets seen) | 47 MiB, flattening |
| both caches at 256, buckets and glibc settings (`fastlm serve`) | 34 MiB, flattening |
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Entries each cache may hold: an encoder uses 4 GEMM shapes (QKV, attention output, FFN in and out)
# per token bucket, 36 buckets for batches of up to 1,500 tokens (144 entries), 64 up to 16,384. At ~1 MiB
# per shape in the two caches (measured), 256 bounds them near 250 MiB whatever the shapes.
CACHE_CAPACITY = 256
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_caches(capacity: int = CACHE_CAPACITY) -> dict[str, str]:
    """Sets ONEDNN_PRIMITIVE_CACHE_CAPACITY and LRU_CACHE_CAPACITY to `capacity` (entries) in this
    process's environment where they are unset; a value the user set is kept. Takes effect only if no
    oneDNN primitive was created yet in this process (both are read once). Returns the values now in
    force {name: value}."""
    for name in CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in CACHE_VARIABLES}


def malloc_settings() -> list[str]:
    """glibc only: caps malloc's arenas at 2 and trims freed memory above 128 KiB back to the OS,
    with allocations of 128 KiB or more served by mmap (so freed activations leave the process), as
    MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=131072 MALLOC_MMAP_THRESHOLD_=131072 would. A setting
    whose variable is set in the environment is left as the user set it. Call it early (before the
    first big allocation): `fastlm serve` does at start. Returns the settings applied (names of the
    variables they stand for); [] off glibc."""
    applied = []
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        options = (("MALLOC_ARENA_MAX", -8, 2), ("MALLOC_TRIM_THRESHOLD_", -1, 131072),
                   ("MALLOC_MMAP_THRESHOLD_", -3, 131072))  # M_ARENA_MAX, M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
        for name, param, value in options:
            if name not in os.environ and libc.mallopt(param, value) == 1:
                applied.append(name)
    except (OSError, AttributeError):  # not glibc
        return []
    log.debug("malloc settings applied: %s", applied)
    return applied


bound_caches()

__all__ = ["CACHE_CAPACITY", "bound_caches", "malloc_settings"]
