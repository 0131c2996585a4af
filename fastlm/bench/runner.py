"""The run behind `fastlm bench`: which cases a suite runs, timing them into rows, and the Result.

Suites: ops (fastlm/bench/ops.py), models (fastlm/bench/models.py + generate.py), peers
(fastlm/bench/peers/suite.py: a process per engine) and all. A new suite is one module with a
`cases(device, dtype) -> list[Case]` function and its case names, added to SUITES and build_cases
here (a suite of separate processes, like peers, has its own run function called from run()).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from fastlm.bench import generate, models, ops
from fastlm.bench.peers.registry import engines
from fastlm.bench.peers.suite import isa_caps, peer_cases, run_peers
from fastlm.bench.peers.workloads import PEER_CASES
from fastlm.bench.result import Case, Ceilings, Result, Row, Skip, format_value, measure_ceilings, save_json, timing

SUITES = ("ops", "models", "all", "peers")
OPS = ops.OPS
MODEL_CASES = models.MODEL_CASES + generate.GENERATE_CASES


def build_cases(device: str, dtype: torch.dtype, suite: str, only: str | None) -> list[Case]:
    """The in-process cases of `suite` (ops | models | all | peers; the peers cases run apart, see
    peer_cases) at the shapes for `device`, or only those named `only`. Nothing is timed or allocated
    beyond small index tensors. Raises ValueError naming the valid suites / case names."""
    if suite not in SUITES:
        raise ValueError(f"--suite must be one of {', '.join(SUITES)}, got {suite!r}")
    cases: list[Case] = []
    if suite in ("models", "all"):  # first: if a time limit cuts the run, the headline rows are in
        cases += models.cases(device, dtype) + generate.cases(device, dtype)
    if suite in ("ops", "all"):
        cases += ops.cases(device, dtype)
    names = sorted(set(OPS) | set(MODEL_CASES) | set(PEER_CASES))
    if only is not None:
        if only not in names:
            raise ValueError(f"--only must be one of {', '.join(names)}, got {only!r}")
        cases = [c for c in cases if c.name == only]
    return cases


def ceiling_pct(case: Case, provider: str, value: float, ceilings: Ceilings) -> tuple[float | None, str | None]:
    """`value` (the row's TFLOP/s or GB/s) as a % of the measured ceiling, or None and why not where
    the ceiling is no upper bound for the row: a working set that the last-level cache holds (the
    copy ceiling is DRAM bandwidth), math in another dtype than the measured matmul's, or a value
    above the ceiling (then the ceiling is not what bounds this row: never printed as > 100%)."""
    if case.unit == "TFLOP/s":
        ceiling, what = ceilings.matmul_tflops, f"{ceilings.matmul_dtype} matmul"
        if case.dtype:
            return None, f"runs {case.dtype}; the ceiling is a {what}"
    else:
        ceiling, what = ceilings.copy_gbs, "DRAM copy"
        nbytes = case.bytes_by.get(provider, case.bytes)
        if ceilings.cache_bytes and nbytes <= 2 * ceilings.cache_bytes:
            return None, (f"working set within 2x the {ceilings.cache_bytes / 2**20:.0f} MiB last-level cache: "
                          f"served from cache, so the {what} bandwidth does not bound it")
    pct = 100 * value / ceiling
    if pct > 100:  # one note for every such row (no value in it): the footnotes group
        return None, f"above the measured {what} ({format_value(ceiling, case.unit)}): that ceiling does not bound it"
    return pct, None


def run_case(case: Case, device: str, ceilings: Ceilings, budget_s: float) -> list[Row]:
    """One row per provider of `case`: its times (timing, `budget_s` seconds: the median in `ms`, the
    spread beside it) and headline value against the ceiling where one bounds it (ceiling_pct); a
    provider that raises Skip, runs out of GPU memory or fails is a row with that status, not a crash."""
    rows = []
    for pname, factory in case.providers.items():
        row = Row(case.name, case.label, pname, x=case.x, unit=case.unit, x_name=case.x_name, dtype=case.dtype)
        try:
            fn = factory()
            t = timing(fn, device, budget_s)
            row.ms, row.ms_min, row.ms_q1, row.ms_q3, row.ms_max, row.n = t.median, t.min, t.q1, t.q3, t.max, t.n
        except Skip as e:
            row.status = f"skipped: {e}"
        except torch.cuda.OutOfMemoryError:
            row.status = "skipped: out of GPU memory"
        except Exception as e:  # a baseline that breaks is a row, not a crash
            row.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if row.ms:
            s = row.ms / 1e3
            if case.unit == "TFLOP/s":
                row.value = case.flops / s / 1e12
            elif case.unit == "GB/s":
                row.value = case.bytes_by.get(pname, case.bytes) / s / 1e9
            elif case.unit == "tok/s":
                row.value = case.tokens / s
            else:
                row.value = row.ms
            if case.unit in ("TFLOP/s", "GB/s"):
                row.pct_of_ceiling, row.pct_note = ceiling_pct(case, pname, row.value, ceilings)
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def skipped_peers() -> list[dict]:
    """The optional peer engines that cannot run here: their title, why, and the command that
    installs them (recorded in the Result's env, so the report names them)."""
    out = []
    for e in engines().values():
        why = e.optional and e.missing()
        if why:
            out.append({"engine": e.title, "why": why.replace(f" ({e.install})", ""), "install": e.install})
    return out


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo (lscpu) gives it, else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def run(device: str, dtype: torch.dtype, suite: str = "all", only: str | None = None, budget_s: float = 0.5,
        progress: Callable[[str], None] | None = None, partial_json: str | None = None,
        rounds: int | None = None, calls: int | None = None, threads: int = 2, isa: str | None = None) -> Result:
    """Every case of the suite, one after the other. With `partial_json`, the results so far are
    rewritten there after each case, so a run cut short by a time limit still leaves its rows.
    The peers cases (fastlm.bench.peers) run first, `rounds` x `calls` per engine (default
    2 x 3), each engine in its own process with `threads`; with `isa` ("avx2") each engine's kernels
    capped at that ISA as far as it can be (fastlm.bench.peers.suite.isa_caps), recorded in the
    Result's env ("forced_isa") and the markdown's header."""
    from fastlm.info import environment

    cases = build_cases(device, dtype, suite, only)
    peers, why_not = peer_cases(device, suite, only)
    ceilings = measure_ceilings(device, dtype)
    env = environment()
    for name, e in engines().items():  # the peer engines' versions (None: not installed)
        env.setdefault(name, e.version())
    env["cpu_model"], env["cpu_count"] = cpu_model(), os.cpu_count()
    if hasattr(os, "getloadavg"):  # other work on the machine while this ran (1-minute load average)
        env["loadavg_start"] = round(os.getloadavg()[0], 2)
    if isa is not None:
        env["forced_isa"] = {"isa": isa, "engines": isa_caps(isa)}
    if peers or why_not:  # the peers suite was asked for: name the engines it cannot run here
        env["peers_skipped"] = skipped_peers()
        if why_not:
            env["peers_not_run"] = why_not
    res = Result(env=env, device=device, dtype=str(dtype).replace("torch.", ""), suite=suite, ceilings=ceilings)
    if peers:
        full = suite == "peers" or only is not None
        rows, ceilings.read_gbs = run_peers(peers, rounds or (2 if full else 1), calls or (3 if full else 2),
                                            threads, progress, **({"isa": isa} if isa else {}))
        res.rows += rows
        if partial_json:
            save_json(res, partial_json)
        if hasattr(os, "getloadavg"):
            env["loadavg_after_peers"] = round(os.getloadavg()[0], 2)
    elif why_not and suite == "peers":
        res.rows += [Row(c, "-", "all", status=f"skipped: {why_not}") for c in PEER_CASES]
    for case in cases:
        if progress:
            progress(f"{case.name} {case.label}")
        res.rows += run_case(case, device, ceilings, budget_s)
        if partial_json:
            save_json(res, partial_json)
    return res
