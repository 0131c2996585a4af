"""`fastlm bench --suite peers`: fastlm against the CPU engines people already run.

The workloads (fastlm/bench/peers/workloads.py: GPT-2 small decode, BERT-base forward) run on every
registered engine (fastlm/bench/peers/registry.py: fastlm, CTranslate2, transformers, ONNX Runtime,
OpenVINO, llama.cpp), fp32, int8 and bf16 (fastlm only). Each engine runs in a process of its own
(fastlm.bench.peers.worker) with the same number of threads, the engines alternating within a
round; a row is the best call over all rounds. An engine that is missing, or cannot prepare or run
a workload, gives skipped rows with the reason.
Each round also measures the machine's read bandwidth (a 384 MB buffer on transparent huge pages
summed by the same threads: fastlm's packed weights live on huge pages too, and on 4 KiB pages the
same sum reads slower than fastlm's decode GEMV does), and the GPT-2 floor is the weight bytes a
decode step must stream divided by the best of those bandwidths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable

from fastlm.bench.peers.base import ISAS
from fastlm.bench.peers.registry import engines, providers
from fastlm.bench.peers.workloads import LABELS, PEER_CASES, UNITS, WORKS, cache_dir, floor_ms
from fastlm.bench.result import Row, Timing


def peer_cases(device: str, suite: str, only: str | None) -> tuple[list[str], str | None]:
    """The peers cases this run times, and why none run where that is the case. `--suite peers`
    (or `--only` naming a peers case) runs them (a missing engine's rows skip with the reason);
    `all`, the plain `fastlm bench`, does not: converting BERT-base and GPT-2 for every installed
    engine (CTranslate2, ONNX Runtime, OpenVINO, ...) takes minutes on 2 cores before any timing,
    so the plain run stays short and names the command instead."""
    if only is not None and only not in PEER_CASES:
        return [], None
    if suite not in ("peers", "all") and only is None:
        return [], None
    if device != "cpu":
        return [], "the peers suite compares CPU engines: run it with --device cpu"
    if suite == "all" and only is None:
        have = [n for n, e in engines().items() if not e.optional or not e.missing()]
        return [], ("they run apart, each engine in its own process: fastlm bench --suite peers "
                    f"(installed here: {', '.join(have)})")
    return [only] if only else list(PEER_CASES), None


def isa_caps(isa: str | None, names: Iterable[str] | None = None) -> dict[str, dict]:
    """engine name -> Engine.isa_cap(isa) for the registered engines (those in `names` only, when
    given); {} without `isa`. ValueError for an ISA that cannot be forced (base.ISAS)."""
    if isa is None:
        return {}
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)} (or None: native), got {isa!r}")
    return {n: e.isa_cap(isa) for n, e in engines().items() if names is None or n in names}


def isa_header(isa: str, caps: dict[str, dict]) -> str:
    """The line a forced-ISA table opens with: the ISA, the CPU's own flags, and how far each engine
    was capped (or why not), so that a table measured on an AVX-512 CPU with AVX2 forced is never
    read as one from an AVX2-only CPU."""
    from fastlm.cpu_features import cpu_flags

    own = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
           if f in cpu_flags()]
    per = "; ".join(f"{engines()[n].title}: {c['forced']} ({c['note']})" for n, c in caps.items())
    return (f"**ISA forced to {isa.upper()}** on a CPU whose own flags are {' '.join(own) or 'unknown'}: "
            f"these rows stand in for an {isa.upper()}-only CPU as far as each engine can be capped. {per}.")


def _worker(args: list[str], threads: int, timeout: float, extra_env: dict[str, str] | None = None) -> dict:
    import fastlm

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(extra_env or {}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastlm.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "bandwidth" in args:  # the buffer on transparent huge pages, as fastlm's packed weights are
        env["THP_MEM_ALLOC_ENABLE"] = "1"  # (torch's CPU allocator reads it at start-up)
    try:
        r = subprocess.run([sys.executable, "-m", "fastlm.bench.peers.worker", *args, "--threads", str(threads)],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exit {r.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def run_peers(works: list[str], rounds: int = 2, calls: int = 3, threads: int = 2,
              progress: Callable[[str], None] | None = None, timeout: float = 900,
              size: str = "base", names: Iterable[str] | None = None,
              isa: str | None = None) -> tuple[list[Row], float | None]:
    """Rows for the peers cases in `works` (names from workloads.WORKS), one per
    registry.providers() entry (of the engines in `names` only, when given: ValueError for an
    unregistered name), and the best read bandwidth (GB/s). `size="tiny"` runs the same on 2-layer
    models (for tests: the floor then means nothing). `isa="avx2"` times every engine with its
    kernels capped at AVX2 as far as it can be (Engine.isa_cap: its environment in its worker
    process; an engine that says "skip" gives skipped rows with the reason); the bandwidth stays
    native (a machine property)."""
    cache = cache_dir()
    say = progress or (lambda msg: None)
    chosen = dict(engines())
    if names is not None:
        names = list(names)
        unknown = [n for n in names if n not in chosen]
        if unknown:
            raise ValueError(f"names must be registered engines ({', '.join(chosen)}), got {unknown}")
        chosen = {n: e for n, e in chosen.items() if n in names}
    rows_of = [r for r in providers() if r[1] in chosen]
    why_not = {name: e.missing() for name, e in chosen.items()}
    caps = isa_caps(isa, chosen)
    for name, c in caps.items():
        if c["forced"] == "skip" and not why_not[name]:
            why_not[name] = f"not run with the ISA forced to {isa}: {c['note']}"
    status: dict[tuple[str, str], str] = {}
    samples: dict[tuple[str, str], list[float]] = {}
    best_cpu: dict[tuple[str, str], float] = {}
    ran_math: dict[tuple[str, str], str] = {}  # the math an engine says it ran (Engine.ran_math)
    for case in works:
        say(f"{case}: preparing the random-weight model (once, in {cache})")
        base = ["--work", WORKS[case], "--cache", cache, "--size", size]
        r = _worker(["prepare", *base], threads, timeout)
        if "error" in r:
            for p, _, _ in rows_of:
                status[(case, p)] = f"failed: prepare: {r['error']}"
            continue
        for name, e in chosen.items():
            if not e.prepares or why_not[name]:
                continue
            say(f"{case}: {e.title}: preparing the model (once)")
            r = _worker(["prepare", *base, "--engine", name], threads, timeout)
            if "skip" in r or "error" in r:  # that engine's rows of this case skip; the others run
                why = r.get("skip") or r["error"]
                for p, n, _ in rows_of:
                    if n == name:
                        status[(case, p)] = f"skipped: {e.title} could not prepare the model: {why}"
    gbs: list[float] = []
    for rnd in range(rounds):
        say(f"peers round {rnd + 1}/{rounds}: read bandwidth")
        r = _worker(["bandwidth", "--cache", cache], threads, timeout)
        gbs += r.get("gbs", [])
        for case in works:
            for p, name, precision in rows_of:
                key = (case, p)
                if key in status:
                    continue
                if why_not[name]:
                    status[key] = f"skipped: {why_not[name]}"
                    continue
                say(f"{case} {p} (round {rnd + 1}/{rounds})")
                r = _worker(["time", "--work", WORKS[case], "--engine", name, "--precision", precision,
                             "--cache", cache, "--calls", str(calls), "--size", size], threads, timeout,
                            *([caps[name]["env"]] if caps.get(name, {}).get("env") else []))
                if "skip" in r:
                    status[key] = f"skipped: {r['skip']}"
                elif "error" in r:
                    status[key] = f"failed: {r['error']}"
                else:
                    samples.setdefault(key, []).extend(r["ms"])
                    best_cpu[key] = min(best_cpu.get(key, float("inf")), *r.get("cpu_ms", [float("inf")]))
                    if r.get("math"):
                        ran_math[key] = r["math"]
    read = max(gbs) if gbs else None
    rows = []
    for case in works:
        work = WORKS[case]
        for p, _, precision in rows_of:
            row = Row(case, LABELS[work], p, unit=UNITS[work], status=status.get((case, p), "ok"),
                      dtype=ran_math.get((case, p), ""))
            if samples.get((case, p)):
                t = Timing.of(samples[(case, p)])  # the row is the best call; its spread beside it
                row.ms = row.value = t.min  # ms per unit (token or call)
                if row.unit == "tok/s":  # batched decode: the whole batch's new tokens per second
                    row.value = 1e3 / t.min
                row.ms_min, row.ms_q1, row.ms_q3, row.ms_max, row.n = t.min, t.q1, t.q3, t.max, t.n
                row.cpu_ms = best_cpu.get((case, p))
                fl = floor_ms(read, precision) if work == "gpt2" and size == "base" else None
                if fl and fl <= row.ms:
                    row.pct_of_ceiling = 100 * fl / row.ms
                elif fl:  # faster than the floor: the measured bandwidth does not bound this engine
                    row.pct_note = (f"faster than the {fl:.1f} ms floor of the measured {read:.1f} GB/s: that "
                                    "bandwidth does not bound this row")
            elif row.status == "ok":
                row.status = "failed: no measurement"
            rows.append(row)
    return rows, read
