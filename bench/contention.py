"""GPT-2 small decode under CPU contention: fastlm against CTranslate2, 1 and 2 threads, idle and with
one competing CPU-bound process on the same cores (issue 19 item 3).

Each measurement is one worker process of the peers suite (fastlm.bench.peers.worker: random-weight
GPT-2 small, greedy, batch 1, 16-token prompt, 32 new tokens, best of --calls calls, ms per token),
every process (the competitor too) pinned to the same cores, engines alternating within a round,
idle and loaded blocks alternating between rounds. The competitor is a Python busy loop.

    PYTHONPATH=. python bench/contention.py [--rounds 2] [--calls 3] [--precision fp32]

Prints the raw ms/token of every round, then per engine: 2 threads / 1 thread (idle, loaded) and
loaded / idle (1 and 2 threads), each from the best of the rounds. Targets: 2 threads never slower
than 1 beyond noise; with the competitor, fastlm slows by no more than CTranslate2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlm.bench.peers import suite, workloads  # noqa: E402


def competitor(cores: set[int]) -> subprocess.Popen:
    """One CPU-bound process (a Python busy loop) pinned to `cores`; bounded: it stops itself after 10 min."""
    code = (f"import os, time\nos.sched_setaffinity(0, {sorted(cores)!r})\n"
            "t = time.time() + 600\nwhile time.time() < t: pass\n")
    return subprocess.Popen([sys.executable, "-c", code])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    p.add_argument("--engines", default="fastlm,ctranslate2")
    a = p.parse_args(argv)
    cores = set(sorted(os.sched_getaffinity(0))[:2])
    os.sched_setaffinity(0, cores)  # the workers inherit it
    cache = workloads.cache_dir()
    engines = a.engines.split(",")
    print(f"cores {sorted(cores)}; load average {os.getloadavg()[0]:.2f}; preparing the model in {cache}", flush=True)
    if "error" in (r := suite._worker(["prepare", "--work", "gpt2", "--cache", cache], 2, 900)):
        sys.exit(f"prepare failed: {r['error']}")
    for e in engines:
        if e != "fastlm":
            r = suite._worker(["prepare", "--work", "gpt2", "--cache", cache, "--engine", e], 2, 900)
            if "error" in r or "skip" in r:
                sys.exit(f"{e}: {r}")
    best: dict[tuple[str, str, int], float] = {}
    print("round | load | threads | " + " | ".join(f"{e} ms/token" for e in engines))
    for rnd in range(a.rounds):
        for load in (("idle", "loaded") if rnd % 2 == 0 else ("loaded", "idle")):
            comp = competitor(cores) if load == "loaded" else None
            try:
                time.sleep(0.5 if comp else 0)
                for threads in (1, 2):
                    cells = []
                    for e in engines:
                        r = suite._worker(["time", "--work", "gpt2", "--engine", e, "--precision", a.precision,
                                           "--cache", cache, "--calls", str(a.calls)], threads, 600)
                        if "ms" not in r:
                            cells.append(str(r))
                            continue
                        ms = min(r["ms"])
                        key = (e, load, threads)
                        best[key] = min(best.get(key, float("inf")), ms)
                        cells.append(f"{ms:.1f} (calls {', '.join(f'{x:.1f}' for x in r['ms'])})")
                    print(f"{rnd + 1} | {load} | {threads} | " + " | ".join(cells), flush=True)
            finally:
                if comp is not None:
                    comp.kill()
                    comp.wait()
    print("\nbest of the rounds, ratios (< 1: faster):")
    for e in engines:
        g = lambda load, t, e=e: best.get((e, load, t))  # noqa: E731
        parts = []
        for load in ("idle", "loaded"):
            if g(load, 1) and g(load, 2):
                parts.append(f"2T/1T {load} {g(load, 2) / g(load, 1):.2f}")
        for t in (1, 2):
            if g("idle", t) and g("loaded", t):
                parts.append(f"loaded/idle {t}T {g('loaded', t) / g('idle', t):.2f}")
        print(f"  {e}: " + "; ".join(parts))
    print(f"load average {os.getloadavg()[0]:.2f} (other jobs on the machine make every number indicative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
