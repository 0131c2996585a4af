"""One engine, one workload, in a process of its own: the worker behind `fastlm bench --suite peers`.

Each engine gets a fresh process with its own thread pool, so no pool fights another and no engine
inherits another's warm caches or allocator state.

    python -m fastlm.bench.peers.worker prepare --work gpt2|bert --cache DIR [--size base|tiny] [--engine NAME]
    python -m fastlm.bench.peers.worker time --work gpt2|gpt2_bB|bert --engine NAME --precision fp32|int8|bf16
        --cache DIR [--calls 3] [--threads 2] [--size base|tiny]
    python -m fastlm.bench.peers.worker bandwidth --cache DIR [--threads 2]

Each prints one JSON line. `prepare` saves the random-weight model ({"dir": ...}), or with --engine
runs that engine's prepare() on it ({"dir": ...} or {"skip": reason}). `time` gives
{"ms": [per call...], "cpu_ms": [...], "per": "token"|"call"} (wall ms per generated token for
GPT-2 decode, per forward for BERT, and the process's CPU time over all its threads for the same;
"math": what the engine reports it ran, where it says (Engine.ran_math)) or {"skip": reason};
`bandwidth` gives {"gbs": [...]}. NAME is a registered engine
(fastlm.bench.peers.registry).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fastlm.bench.peers import workloads
from fastlm.bench.peers.base import Engine
from fastlm.bench.peers.registry import PRECISIONS, engines
from fastlm.bench.result import Skip

READ_MB = 384  # the bandwidth buffer: far larger than any L3 here


def engine(name: str) -> Engine:
    """The registered engine `name`; ValueError naming the registered ones otherwise."""
    known = engines()
    if name not in known:
        raise ValueError(f"engine must be one of {', '.join(known)}, got {name!r}")
    return known[name]


def prepare(cache: str, work: str, size: str = "base", name: str | None = None) -> str:
    """Save the workload's random-weight model once; with `name`, then run that engine's prepare()
    on it (Skip when the engine is missing or cannot take the model). Returns the model directory."""
    d = workloads.prepare(cache, work, size)
    if name is not None:
        e = engine(name)
        why = e.missing()
        if why:
            raise Skip(why)
        e.prepare(work, d)
    return d


def timed(work: str, name: str, precision: str, d: str, threads: int, calls: int) -> dict:
    """Time `calls` calls of one engine on one workload after a warm-up call: the `time` action's JSON."""
    import torch

    e = engine(name)
    why = e.missing()
    if why:
        raise Skip(why)
    if workloads.batch_of(work) is not None and not e.batch_decode:
        raise Skip(f"the peers suite has no batched-decode runner for {e.title}")
    torch.set_num_threads(threads)
    with open(os.path.join(d, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    run, per = e.runner(work, precision, d, workloads.inputs(work, vocab), threads)
    run()  # warm-up: allocations, caches, lazy init
    ms, cpu_ms = [], []
    for _ in range(calls):
        c0, t0 = time.process_time(), time.perf_counter()
        run()
        ms.append((time.perf_counter() - t0) * 1e3 / per)
        cpu_ms.append((time.process_time() - c0) * 1e3 / per)  # all threads of this process
    out = {"ms": ms, "cpu_ms": cpu_ms, "per": "token" if per > 1 else "call"}
    if e.ran_math():
        out["math"] = e.ran_math()
    return out


def read_bandwidth(threads: int, calls: int) -> list[float]:
    """GB/s of a READ_MB fp32 buffer summed by `threads` threads: the machine's read bandwidth,
    the bound a decode step that streams its weights from DRAM cannot beat. The peers suite runs it
    with THP_MEM_ALLOC_ENABLE=1 (the buffer on transparent huge pages, as fastlm's packed weights)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(READ_MB * 2**20 // 4)
    x.sum()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        x.sum()
        out.append(x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.bench.peers.worker")
    p.add_argument("action", choices=["prepare", "time", "bandwidth"])
    p.add_argument("--work", choices=sorted(set(workloads.WORKS.values())), default="gpt2")
    p.add_argument("--engine", default=None, help="a registered engine (time: default fastlm)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    p.add_argument("--cache", required=True)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", choices=["base", "tiny"], default="base")
    a = p.parse_args(argv)
    try:
        if a.action == "prepare":
            out = {"dir": prepare(a.cache, a.work, a.size, a.engine)}
        elif a.action == "bandwidth":
            out = {"gbs": read_bandwidth(a.threads, max(a.calls, 3))}
        else:
            out = timed(a.work, a.engine or "fastlm", a.precision, workloads.model_dir(a.cache, a.work, a.size),
                        a.threads, a.calls)
    except Skip as e:
        out = {"skip": str(e)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
