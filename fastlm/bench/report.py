"""Reporting of `fastlm bench`, read from a Result (or its JSON) alone: speedups, compare, the
markdown table (median and spread of the calls, values in units that read, % of a ceiling only
where it bounds the row, footnotes saying why not), the peers table and the peers that did not
run. The plots are in fastlm/bench/plots.py. Nothing here times anything.
"""

from __future__ import annotations

from fastlm.bench.peers.registry import engines, providers
from fastlm.bench.peers.suite import isa_header
from fastlm.bench.peers.workloads import WORKS, batch_of, floor_ms, gpt2_weight_bytes
from fastlm.bench.result import Result, Row, format_value


def speedups(res: Result) -> dict[tuple[str, str], dict[str, float]]:
    """fastlm's time over each baseline's, per (case, label): > 1 means fastlm is faster."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    by_key: dict[tuple[str, str], dict[str, Row]] = {}
    for r in res.rows:
        by_key.setdefault((r.case, r.label), {})[r.provider] = r
    for key, provs in by_key.items():
        f = provs.get("fastlm")
        if f is None or f.ms is None:
            continue
        out[key] = {p: r.ms / f.ms for p, r in provs.items() if p != "fastlm" and r.ms}
    return out


def compare(old: dict, new: dict, threshold: float = 0.05) -> list[dict]:
    """Rows measured in OLD that NEW ran, with their time ratio new/old; regressions have ratio >
    1 + threshold. A row measured in OLD whose provider failed in NEW (status "failed: ...") is a
    regression with new_ms and ratio None and its status; rows NEW skipped or did not run are left
    out. Raises ValueError when no (case, shape, provider) was measured in both (nothing compared)."""
    idx = {(r["case"], r["label"], r["provider"]): r for r in old["rows"] if r.get("ms")}
    out = []
    for r in new["rows"]:
        o = idx.get((r["case"], r["label"], r["provider"]))
        if o is None:
            continue
        row = {"case": r["case"], "label": r["label"], "provider": r["provider"], "old_ms": o["ms"]}
        if r.get("ms"):
            ratio = r["ms"] / o["ms"]
            out.append({**row, "new_ms": r["ms"], "ratio": ratio, "regression": ratio > 1 + threshold})
        elif str(r.get("status", "")).startswith("failed"):  # measured before, broken now
            out.append({**row, "new_ms": None, "ratio": None, "regression": True, "status": r["status"]})
    if not out:
        raise ValueError("--compare: no (case, shape, provider) measured in both files: nothing to compare "
                         "(another suite, device or dtype?)")
    return out


def _peer_versions(env: dict) -> str:
    """ "ctranslate2 4.8.5": the optional peer engines' versions as recorded in env."""
    first = {}
    for name, e in engines().items():
        first.setdefault(e.module, name)
    return ", ".join(f"{name} {env.get(name)}" for name, e in engines().items()
                     if e.optional and name == first[e.module])  # an engine run twice (OpenVINO), once


def _ms(v: float | None) -> str:
    return f"{v:.3f}" if v is not None else "-"


def spread(r: Row) -> tuple[str, str, str]:
    """The row's "min / max" ms, its IQR (q1 - q3) and count as table cells; "-" for rows without them
    (skipped, or JSON from before the spread was kept)."""
    if r.ms_min is None or r.ms_max is None:
        return "-", "-", "-"
    iqr = f"{_ms(r.ms_q1)} - {_ms(r.ms_q3)}" if r.ms_q1 is not None and r.ms_q3 is not None else "-"
    return f"{_ms(r.ms_min)} / {_ms(r.ms_max)}", iqr, str(r.n) if r.n else "-"


def pct_cell(r: Row, notes: list[str]) -> str:
    """The % of ceiling cell: the percent (never over 100), or "n/a [k]" with footnote k in `notes`
    saying why no ceiling bounds the row, or "-" where no ceiling applies (ms, tok/s)."""
    if r.pct_of_ceiling is not None and r.pct_of_ceiling <= 100:
        return f"{r.pct_of_ceiling:.0f}%"
    if r.pct_note:
        if r.pct_note not in notes:
            notes.append(r.pct_note)
        return f"n/a [{notes.index(r.pct_note) + 1}]"
    return "-"


def skipped_peers_lines(env: dict) -> list[str]:
    """One line per peer engine that did not run, with the command that installs it, and why the
    peers suite did not run at all where that is the case (from the Result's env)."""
    out = [f"{s['engine']} was not run: {s['why']}. Install it with: {s['install']}"
           for s in env.get("peers_skipped", [])]
    if env.get("peers_not_run"):
        out.append(f"The peers suite did not run: {env['peers_not_run']}")
    return out


def markdown(res: Result) -> str:
    """The run as markdown: environment, ceilings, one table line per row (median ms, min / max,
    IQR, calls, value, % of ceiling), footnotes, then the peers table and the peers not run."""
    env, c = res.env, res.ceilings
    cache = f" (the last-level cache is {c.cache_bytes / 2**20:.0f} MiB)" if c.cache_bytes else ""
    lines = [f"# fastlm bench: {env.get('gpu') or 'CPU'} ({res.dtype})", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"CUDA {env.get('cuda')}, driver {env.get('driver', '-')}, fastlm {env['fastlm']} ({env['git_sha']})", "",
             *([f"CPU: {env['cpu_model']}, {env.get('cpu_count')} cores; {_peer_versions(env)}; "
                f"1-minute load average {env.get('loadavg_start', '-')} at the start, "
                f"{env.get('loadavg_after_peers', '-')} after the peers suite", ""]
               if env.get("cpu_model") and not env.get("gpu") else []),
             *([isa_header(env["forced_isa"]["isa"], env["forced_isa"]["engines"]), ""]
               if env.get("forced_isa") else []),
             f"Measured ceilings (best call): DRAM copy {format_value(c.copy_gbs, 'GB/s')}{cache}, "
             f"{c.matmul_dtype} matmul {format_value(c.matmul_tflops, 'TFLOP/s')}", "",
             "ms: the median of the n timed calls (peers rows: the best call), min / max and the "
             "interquartile range beside it.", "",
             "| case | shape | provider | ms | min / max ms | IQR ms | n | value | % ceiling | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for r in res.rows:
        val = format_value(r.value, r.unit) if r.value is not None else "-"
        lines.append(f"| {r.case} | {r.label} | {r.provider} | {_ms(r.ms)} | {' | '.join(spread(r))} | {val} | "
                     f"{pct_cell(r, notes)} | {r.status} |")
    if notes:
        lines += ["", "No % of ceiling where no measured ceiling bounds the row:", ""]
        lines += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    peers = peers_markdown(res.rows, res.ceilings.read_gbs)
    skipped = skipped_peers_lines(env)
    return "\n".join(lines) + "\n" + ("\n" + peers if peers else "") + \
        ("\n## Peer engines not run\n\n" + "\n".join(f"- {s}" for s in skipped) + "\n" if skipped else "")


def peers_markdown(rows: list[Row], read_gbs: float | None) -> str:
    """The engines side by side: one line per (engine, precision), GPT-2 and BERT columns, and the
    bandwidth floor lines."""
    by = {(r.case, r.provider): r for r in rows}
    if not any(r.case in WORKS for r in rows):
        return ""

    def cell(case, p):
        r = by.get((case, p))
        if r is None:
            return "-"
        if r.ms is None:
            return r.status
        notes = [f"slowest of {r.n} calls {r.ms_max:.1f}"] if r.ms_max is not None and r.n else []
        if r.pct_of_ceiling and r.pct_of_ceiling <= 100:
            notes.append(f"{r.pct_of_ceiling:.0f}% of floor speed")
        elif r.pct_note:
            notes.append("faster than the floor: the measured bandwidth does not bound it")
        cpu = f"; CPU {r.cpu_ms:.1f}" if r.cpu_ms is not None and r.cpu_ms != float("inf") else ""
        return f"{r.ms:.1f}" + (f" ({'; '.join(notes)})" if notes else "") + cpu

    bw = f"{read_gbs:.1f} GB/s" if read_gbs else "not measured"
    out = ["## fastlm and its peers on this CPU", "",
           ("Each engine in its own process, engines alternating, best call of all rounds (the slowest beside "
            "it); GPT-2 wall ms per generated token (16-token prompt, 32 greedy tokens, batch 1), BERT wall "
            "ms per forward (batch 8, "
            f"128 tokens). Read bandwidth measured in the same run: {bw}. \"CPU\": the best CPU time of the "
            "engine's process over all its threads for the same unit (steadier than wall time on a shared "
            "machine; spinning threads count)."), "",
           "| engine | precision | GPT-2 small decode ms/token | BERT-base B8 S128 ms |", "|---|---|---|---|"]
    for p, name, prec in providers():
        e = engines()[name]
        # the math the engine said it ran (Row.dtype, e.g. OpenVINO's bf16 default), else what it is set up for
        ran = list(dict.fromkeys(r.dtype for r in rows if r.provider == p and r.dtype))
        out.append(f"| {e.label(prec)} | {' / '.join(ran) or e.math(prec)} | {cell('peers_gpt2_decode', p)} | "
                   f"{cell('peers_bert_fwd', p)} |")
    for prec in ("fp32", "bf16", "int8"):
        fl = floor_ms(read_gbs, prec)
        if fl:
            out.append(f"| floor: {gpt2_weight_bytes(prec) / 1e6:.0f} MB of weights / {bw} | {prec} | {fl:.1f} | - |")
    return "\n".join(out) + "\n" + batch_markdown(rows)


def batch_markdown(rows: list[Row]) -> str:
    """The batched-decode rows (workloads.GPT2_BATCHES): tokens/s of the whole batch per engine, one
    column per batch; empty when none ran."""
    cases = [c for c, w in WORKS.items() if batch_of(w) is not None and any(r.case == c for r in rows)]
    if not cases:
        return ""
    by = {(r.case, r.provider): r for r in rows}

    def cell(case, p):
        r = by.get((case, p))
        if r is None:
            return "-"
        if r.value is None:
            return r.status
        slow = f" (slowest {1e3 / r.ms_max:.0f})" if r.ms_max else ""
        return f"{r.value:.0f}{slow}"

    out = ["", "### Batched greedy decode", "",
           ("GPT-2 small, B prompts of 16 tokens, 32 new tokens each (one generate call, the prefill included): "
            "new tokens per second of the whole batch, best call (the slowest call's rate beside it), each engine "
            "in its own process with the same threads."), "",
           "| engine | precision | " + " | ".join(f"B={batch_of(WORKS[c])} tok/s" for c in cases) + " |",
           "|---|---|" + "---|" * len(cases)]
    for p, name, prec in providers():
        e = engines()[name]
        if all((c, p) not in by or by[(c, p)].status.startswith("skipped") for c in cases):
            continue  # an engine without a batched runner: no line of skips
        out.append(f"| {e.label(prec)} | {e.math(prec)} | " + " | ".join(cell(c, p) for c in cases) + " |")
    return "\n".join(out) + "\n"
