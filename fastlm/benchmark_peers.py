"""`fastlm bench --suite peers`: fastlm against the CPU engines people already run.

GPT-2 small greedy decode (batch 1, 16-token prompt, 32 new tokens; ms per generated token, the
prompt's prefill included) and BERT-base forward (batch 8, 128 tokens; ms), fp32 and int8, for
fastlm, CTranslate2 (when installed: `pip install 'fastlm[peers]'`) and transformers (sdpa).
Random weights (GPT2Config() / BertConfig()), saved once under the cache directory
($FASTLM_BENCH_CACHE, default ~/.cache/fastlm/bench) and converted offline for CTranslate2.

Each engine runs in a process of its own (fastlm.benchmark_worker) with the same number of threads,
the engines alternating within a round; a row is the best call over all rounds. Each round also
measures the machine's read bandwidth (a 384 MB buffer on transparent huge pages summed by the same
threads: fastlm's packed weights live on huge pages too, and on 4 KiB pages the same sum reads
slower than fastlm's decode GEMV does), and the GPT-2 floor is the weight bytes a decode step
must stream divided by the best of those bandwidths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

from fastlm.benchmark import Row

WORKS = {"peers_gpt2_decode": "gpt2", "peers_bert_fwd": "bert"}
LABELS = {"gpt2": "GPT-2 small B1 prompt16 new32", "bert": "BERT-base B8 S128"}
UNITS = {"gpt2": "ms/token", "bert": "ms"}
# (provider, engine, precision); fastlm's int8 is quantize="int8" for GPT-2, "int8_dynamic" for BERT
ENGINES = (("ctranslate2", "ctranslate2", "fp32"), ("fastlm", "fastlm", "fp32"),
           ("transformers", "transformers", "fp32"), ("ctranslate2_int8", "ctranslate2", "int8"),
           ("fastlm_int8", "fastlm", "int8"), ("transformers_int8", "transformers", "int8"))
PRETTY = {"ctranslate2": ("CTranslate2", "fp32"), "ctranslate2_int8": ("CTranslate2", "int8"),
          "fastlm": ("fastlm", "fp32"), "fastlm_int8": ("fastlm", "int8 (GPT-2 int8, BERT int8_dynamic)"),
          "transformers": ("transformers (sdpa)", "fp32"),
          "transformers_int8": ("transformers (sdpa) + torch dynamic", "int8 (torch.ao quantize_dynamic)")}


def cache_dir() -> str:
    return os.environ.get("FASTLM_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastlm", "bench")


def ctranslate2_version() -> str | None:
    try:
        import ctranslate2
    except ImportError:
        return None
    return ctranslate2.__version__


def gpt2_weight_bytes(precision: str, n_layer: int = 12, d: int = 768, vocab: int = 50257) -> float:
    """Bytes a GPT-2 decode step streams: every block projection (QKV, out, FFN: 12 d^2 per layer)
    and the tied LM head once; biases, LayerNorms (and int8's per-channel fp32 scales) in fp32.
    GPT-2 small: 494 MB fp32, 125 MB int8. The KV cache and the two embedding rows are ignored."""
    big = n_layer * 12 * d * d + vocab * d
    small = n_layer * (3 * d + d + 4 * d + d + 4 * d) + 2 * d  # biases + LayerNorm weights/biases
    if precision == "fp32":
        return 4.0 * (big + small)
    scales = n_layer * (3 * d + d + 4 * d + d) + vocab
    return 1.0 * big + 4.0 * (small + scales)


def floor_ms(read_gbs: float | None, precision: str) -> float | None:
    """The bandwidth floor of one GPT-2 small decode token in ms."""
    if not read_gbs:
        return None
    return gpt2_weight_bytes(precision) / (read_gbs * 1e9) * 1e3


def _worker(args: list[str], threads: int, timeout: float) -> dict:
    import fastlm

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastlm.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "bandwidth" in args:  # the buffer on transparent huge pages, as fastlm's packed weights are
        env["THP_MEM_ALLOC_ENABLE"] = "1"  # (torch's CPU allocator reads it at start-up)
    try:
        r = subprocess.run([sys.executable, "-m", "fastlm.benchmark_worker", *args, "--threads", str(threads)],
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
              size: str = "base") -> tuple[list[Row], float | None]:
    """Rows for the peers cases in `works` (names from WORKS) and the best read bandwidth (GB/s).
    `size="tiny"` runs the same on 2-layer models (for tests: the floor then means nothing)."""
    cache = cache_dir()
    have_ct2 = ctranslate2_version() is not None
    say = progress or (lambda msg: None)
    status: dict[tuple[str, str], str] = {}
    best: dict[tuple[str, str], float] = {}
    best_cpu: dict[tuple[str, str], float] = {}
    for case in works:
        say(f"{case}: preparing the random-weight model (once, in {cache})")
        r = _worker(["prepare", "--work", WORKS[case], "--cache", cache, "--size", size], threads, timeout)
        if "error" in r:
            for p, _, _ in ENGINES:
                status[(case, p)] = f"failed: prepare: {r['error']}"
    gbs: list[float] = []
    for rnd in range(rounds):
        say(f"peers round {rnd + 1}/{rounds}: read bandwidth")
        r = _worker(["time", "--engine", "bandwidth", "--cache", cache], threads, timeout)
        gbs += r.get("gbs", [])
        for case in works:
            for p, engine, precision in ENGINES:
                key = (case, p)
                if key in status:
                    continue
                if engine == "ctranslate2" and not have_ct2:
                    status[key] = "skipped: ctranslate2 is not installed (pip install 'fastlm[peers]')"
                    continue
                say(f"{case} {p} (round {rnd + 1}/{rounds})")
                r = _worker(["time", "--work", WORKS[case], "--engine", engine, "--precision", precision,
                             "--cache", cache, "--calls", str(calls), "--size", size], threads, timeout)
                if "skip" in r:
                    status[key] = f"skipped: {r['skip']}"
                elif "error" in r:
                    status[key] = f"failed: {r['error']}"
                else:
                    best[key] = min(best.get(key, float("inf")), *r["ms"])
                    best_cpu[key] = min(best_cpu.get(key, float("inf")), *r.get("cpu_ms", [float("inf")]))
    read = max(gbs) if gbs else None
    rows = []
    for case in works:
        work = WORKS[case]
        for p, _, precision in ENGINES:
            row = Row(case, LABELS[work], p, unit=UNITS[work], status=status.get((case, p), "ok"))
            if (case, p) in best:
                row.ms = row.value = best[(case, p)]
                row.cpu_ms = best_cpu.get((case, p))
                fl = floor_ms(read, precision) if work == "gpt2" and size == "base" else None
                row.pct_of_ceiling = 100 * fl / row.ms if fl else None
            elif row.status == "ok":
                row.status = "failed: no measurement"
            rows.append(row)
    return rows, read


def markdown(rows: list[Row], read_gbs: float | None) -> str:
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
        pct = f" ({r.pct_of_ceiling:.0f}% of floor speed)" if r.pct_of_ceiling else ""
        cpu = f"; CPU {r.cpu_ms:.1f}" if r.cpu_ms is not None and r.cpu_ms != float("inf") else ""
        return f"{r.ms:.1f}{pct}{cpu}"

    bw = f"{read_gbs:.1f} GB/s" if read_gbs else "not measured"
    out = ["## fastlm and its peers on this CPU", "",
           ("Each engine in its own process, engines alternating, best call of all rounds; GPT-2 wall ms per "
            "generated token (16-token prompt, 32 greedy tokens, batch 1), BERT wall ms per forward (batch 8, "
            f"128 tokens). Read bandwidth measured in the same run: {bw}. \"CPU\": the best CPU time of the "
            "engine's process over all its threads for the same unit (steadier than wall time on a shared "
            "machine; spinning threads count)."), "",
           "| engine | precision | GPT-2 small decode ms/token | BERT-base B8 S128 ms |", "|---|---|---|---|"]
    for p, _, _ in ENGINES:
        name, prec = PRETTY[p]
        out.append(f"| {name} | {prec} | {cell('peers_gpt2_decode', p)} | {cell('peers_bert_fwd', p)} |")
    for prec in ("fp32", "int8"):
        fl = floor_ms(read_gbs, prec)
        if fl:
            out.append(f"| floor: {gpt2_weight_bytes(prec) / 1e6:.0f} MB of weights / {bw} | {prec} | {fl:.1f} | - |")
    return "\n".join(out) + "\n"


def plot(rows: list[Row], read_gbs: float | None, path: str, title: str = "") -> str | None:
    """Horizontal bars: GPT-2 ms/token per engine (bandwidth floors dashed) and BERT ms per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in WORKS if any(r.case == c and r.ms for r in rows)]
    if not cases:
        return None
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 3.8), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        rs = [r for r in rows if r.case == case and r.ms]
        names = [" ".join(PRETTY[r.provider]).split(" (GPT-2")[0].split(" (torch.ao")[0] for r in rs]
        colors = ["C0" if r.provider.startswith("fastlm") else "C1" if r.provider.startswith("ctranslate2") else "C2"
                  for r in rs]
        ax.barh(names, [r.ms for r in rs], color=colors)
        for i, r in enumerate(rs):
            ax.text(r.ms, i, f" {r.ms:.1f}", va="center", fontsize=8)
        if WORKS[case] == "gpt2":
            for prec, ls in (("fp32", "--"), ("int8", ":")):
                fl = floor_ms(read_gbs, prec)
                if fl:
                    ax.axvline(fl, color="k", ls=ls, lw=1, label=f"{prec} bandwidth floor {fl:.1f} ms")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel(UNITS[WORKS[case]] + " (lower is better)")
        ax.set_title(LABELS[WORKS[case]], fontsize=10)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
