"""Reporting of `fastlm bench`, read from a Result (or its JSON) alone: speedups, compare, the
markdown table and the plots, the peers table and bar plot included. Nothing here times anything.
"""

from __future__ import annotations

import os

from fastlm.bench.peers.registry import engines, providers
from fastlm.bench.peers.workloads import LABELS, PEER_CASES, UNITS, WORKS, floor_ms, gpt2_weight_bytes
from fastlm.bench.result import Result, Row


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
    """Rows present in both runs with their time ratio new/old; regressions have ratio > 1 + threshold."""
    idx = {(r["case"], r["label"], r["provider"]): r for r in old["rows"] if r.get("ms")}
    out = []
    for r in new["rows"]:
        o = idx.get((r["case"], r["label"], r["provider"]))
        if o is None or not r.get("ms"):
            continue
        ratio = r["ms"] / o["ms"]
        out.append({"case": r["case"], "label": r["label"], "provider": r["provider"], "old_ms": o["ms"],
                    "new_ms": r["ms"], "ratio": ratio, "regression": ratio > 1 + threshold})
    return out


def _peer_versions(env: dict) -> str:
    """ "ctranslate2 4.8.5": the optional peer engines' versions as recorded in env."""
    return ", ".join(f"{name} {env.get(name)}" for name, e in engines().items() if e.optional)


def _variant(r: Row) -> str:
    """The part of a label that is not the x value: "B2 H4 S256 D64 causal" -> "B2 H4 D64 causal"."""
    return " ".join(w for w in r.label.split() if not (w.startswith(("S", "ctx", "M", "R", "N")) and w[-1].isdigit()))


def plot(res: Result, out_dir: str) -> list[str]:
    """One PNG per case: metric against x, one colour per provider, one line style per variant
    (shape family), and the measured ceiling drawn as a dashed line where one applies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    peers = [r for r in res.rows if r.case in PEER_CASES]
    env = res.env
    title = (f"{env.get('cpu_model', 'CPU')}, {env.get('cpu_count')} cores; torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}, {_peer_versions(env)}")
    p = peers_plot(peers, res.ceilings.read_gbs, os.path.join(out_dir, f"peers_{res.device}.png"), title)
    if p:
        paths.append(p)
    by_case: dict[str, list[Row]] = {}
    for r in res.rows:
        if r.case not in PEER_CASES:
            by_case.setdefault(r.case, []).append(r)
    styles = ["-", "--", ":", "-."]
    for case, rows in by_case.items():
        provs = list(dict.fromkeys(r.provider for r in rows))
        variants = list(dict.fromkeys(_variant(r) for r in rows))
        colors = {p: f"C{i}" for i, p in enumerate(provs)}
        fig, ax = plt.subplots(figsize=(8, 5))
        unit = rows[0].unit
        for p in provs:
            for vi, var in enumerate(variants):
                pts = sorted((r.x, r.value) for r in rows if r.provider == p and _variant(r) == var and r.value)
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                label = p if len(variants) == 1 else f"{p} [{var}]"
                ax.plot(xs, ys, marker="o", color=colors[p], ls=styles[vi % len(styles)], label=label)
        c = res.ceilings
        if unit == "TFLOP/s":
            ax.axhline(c.matmul_tflops, color="k", ls="--", lw=1,
                       label=f"measured {c.matmul_dtype} matmul: {c.matmul_tflops:.3g} TFLOP/s")
        elif unit == "GB/s":
            ax.axhline(c.copy_gbs, color="k", ls="--", lw=1, label=f"measured copy: {c.copy_gbs:.3g} GB/s")
        if len({r.x for r in rows}) > 1:
            ax.set_xscale("log", base=2)
        xlabel = {"ffn_prefill": "rows (M)", "ffn_decode": "rows (M)", "bias_gelu": "rows (M)",
                  "softmax": "row length", "layer_norm": "row length", "decode_attention": "context length"}
        ax.set_xlabel(xlabel.get(case, "sequence length"))
        ax.set_ylabel(unit + (" (higher is better)" if unit != "ms" else ""))
        where = res.env.get("gpu") or f"CPU ({res.env.get('cpu_threads')} threads; small shapes)"
        ax.set_title(f"fastlm bench: {case}, {res.dtype}, {where}")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        path = os.path.join(out_dir, f"{case}_{res.device}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(res: Result) -> str:
    """The run as markdown: environment, ceilings, one table line per row, then the peers table."""
    env = res.env
    lines = [f"# fastlm bench: {env.get('gpu') or 'CPU'} ({res.dtype})", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"CUDA {env.get('cuda')}, driver {env.get('driver', '-')}, fastlm {env['fastlm']} ({env['git_sha']})", "",
             *([f"CPU: {env['cpu_model']}, {env.get('cpu_count')} cores; {_peer_versions(env)}; "
                f"1-minute load average {env.get('loadavg_start', '-')} at the start, "
                f"{env.get('loadavg_after_peers', '-')} after the peers suite", ""]
               if env.get("cpu_model") and not env.get("gpu") else []),
             f"Measured ceilings: copy {res.ceilings.copy_gbs:.0f} GB/s, {res.ceilings.matmul_dtype} matmul "
             f"{res.ceilings.matmul_tflops:.1f} TFLOP/s", "",
             "| case | shape | provider | ms | value | % ceiling | status |", "|---|---|---|---|---|---|---|"]
    for r in res.rows:
        val = f"{r.value:.1f} {r.unit}" if r.value is not None else "-"
        pct = f"{r.pct_of_ceiling:.0f}%" if r.pct_of_ceiling is not None else "-"
        ms = f"{r.ms:.3f}" if r.ms is not None else "-"
        lines.append(f"| {r.case} | {r.label} | {r.provider} | {ms} | {val} | {pct} | {r.status} |")
    peers = peers_markdown(res.rows, res.ceilings.read_gbs)
    return "\n".join(lines) + "\n" + ("\n" + peers if peers else "")


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
    for p, name, prec in providers():
        e = engines()[name]
        out.append(f"| {e.label(prec)} | {e.math(prec)} | {cell('peers_gpt2_decode', p)} | "
                   f"{cell('peers_bert_fwd', p)} |")
    for prec in ("fp32", "int8"):
        fl = floor_ms(read_gbs, prec)
        if fl:
            out.append(f"| floor: {gpt2_weight_bytes(prec) / 1e6:.0f} MB of weights / {bw} | {prec} | {fl:.1f} | - |")
    return "\n".join(out) + "\n"


def peers_plot(rows: list[Row], read_gbs: float | None, path: str, title: str = "") -> str | None:
    """Horizontal bars: GPT-2 ms/token per engine (bandwidth floors dashed) and BERT ms per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in WORKS if any(r.case == c and r.ms for r in rows)]
    if not cases:
        return None
    engine_of = {p: name for p, name, _ in providers()}
    # the bar's name: the engine's label and its math up to any " (...)" detail
    pretty = {p: f"{engines()[name].label(prec)} {engines()[name].math(prec).split(' (')[0]}"
              for p, name, prec in providers()}
    others = [name for name in engines() if name != "fastlm"]  # fastlm blue, the others C1, C2, ...
    color = {name: "C0" if name == "fastlm" else f"C{others.index(name) + 1}" for name in engines()}
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 3.8), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        rs = [r for r in rows if r.case == case and r.ms]
        names = [pretty[r.provider] for r in rs]
        colors = [color[engine_of[r.provider]] for r in rs]
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
