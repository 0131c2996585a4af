"""Batch split for CPU encoder forwards (issue 19): a batch of B sequences runs as n chunks of
about B / n sequences, one per thread, each chunk's ops single-threaded, instead of every op
split over n threads.

Why: with intra-op threads every GEMM, epilogue and attention call of a BERT forward ends in an
OpenMP barrier (~190 per BERT-base forward), and each thread gets a thin slice of each op. With a
chunk per thread the threads meet once per forward and each runs whole single-thread GEMMs
(oneDNN's int8 GEMM on one Zen 4 core: ~430 G int8 ops/s of CPU time, ~90% of the core's VNNI
rate). Each real token's output depends on its own sequence only, so a chunk computes exactly
what the whole batch computes for its rows (int8_dynamic: bit for bit; the GEMM is exact and
every other op is per row or per sequence; float32 the same bits where measured; bfloat16 within
oneDNN's own row-count dependence: its bf16 matmul may block the sum differently for other M, so
outputs can differ by an ulp of bf16 from the unsplit forward's, as they do between batch sizes).

Used by the encoders' forward (fastlm/models/bert.py) when `n_chunks` says so: CPU tensors, an
int8_dynamic model, a float32 one where fastlm._C runs AVX2 (its one-thread chunks run fastlm's
packed GEMM) or a bfloat16 one on a CPU with AMX-BF16 (the paths measured, see docs/design.md,
Performance, and BertModel._batch_split_ok), torch.get_num_threads()
>= 2, at least 2 sequences and MIN_ROWS tokens per chunk. `FASTLM_CPU_BATCH_SPLIT=0` turns it off.

Threads: a pool of n worker threads made on first use, each with torch.set_num_threads(1) (a
per-thread setting under OpenMP: the calling thread keeps its own); the process default that
new threads read is restored after the workers start. A forward called from inside a worker
does not split again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from fastlm import _ext

MIN_ROWS = 128  # tokens per chunk below which the batch is not split

_lock = threading.Lock()
_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_n = 0
_pool_pid = 0  # a forked child has the pool object but not its threads: it makes its own


def enabled() -> bool:
    """FASTLM_CPU_BATCH_SPLIT (default on; "0" turns it off), read at every call."""
    return os.environ.get("FASTLM_CPU_BATCH_SPLIT", "1") != "0"


def in_worker() -> bool:
    """Whether the calling thread is one of the split pool's workers."""
    return getattr(_local, "worker", False)


def n_chunks(input_ids: Tensor, min_rows: int | None = None) -> int:
    """How many chunks to run a (B, S) batch in: 1 (no split) off CPU, when disabled, inside a
    worker, with one intra-op thread, or with fewer than 2 sequences or `min_rows` (default
    MIN_ROWS) tokens per chunk."""
    if input_ids.device.type != "cpu" or input_ids.dim() != 2 or not enabled() or in_worker():
        return 1
    B, S = input_ids.shape
    n = min(torch.get_num_threads(), B, (B * S) // (MIN_ROWS if min_rows is None else min_rows))
    return n if n >= 2 else 1


def _init_worker() -> None:
    _local.worker = True
    torch.set_num_threads(1)
    # at::parallel_for initialises a thread's OpenMP thread count on its first call from the
    # process default, once per thread AND per shared library (the flag is a thread_local in an
    # inline header function): run one in libtorch and one in fastlm._C now, while the default
    # reads 1, or the first fastlm._C op of a chunk would set this worker back to the default.
    torch.ones(1 << 16).sum()
    if _ext.available():
        torch.ops.fastlm.quantize_rows_int8(torch.ones(64, 256), None)


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_n, _pool_pid
    with _lock:
        if _pool is None or _pool_n != n or _pool_pid != os.getpid():
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=True)
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="fastlm-split", initializer=_init_worker)
            barrier = threading.Barrier(n)  # n tasks that wait for each other: all n workers start now
            list(pool.map(lambda _: barrier.wait(), range(n)))
            torch.set_num_threads(threads)  # the process default (set to 1 by the workers) back
            _pool, _pool_n, _pool_pid = pool, n, os.getpid()
        return _pool


def _run(fn: Callable, args: Sequence):
    with torch.inference_mode():
        return fn(*args)


def run(fn: Callable, n: int, args: Sequence[Tensor | None]) -> list:
    """fn(*chunk_args) for each of n chunks of args along dim 0 (None stays None), one chunk per
    pool worker, in chunk order. n >= 2. Exceptions of a chunk are raised here."""
    if n < 2:
        raise ValueError(f"cpu_split.run: n must be >= 2, got {n}")
    parts = [None if a is None else a.tensor_split(n) for a in args]
    pool = _get_pool(n)
    futs = [pool.submit(_run, fn, [None if p is None else p[i] for p in parts]) for i in range(n)]
    return [f.result() for f in futs]
