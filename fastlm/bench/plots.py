"""The plots of `fastlm bench`, read from a Result alone: one figure per case, and the peers' bars.

A case measured at several values of what it varies (sequence length, rows, ...) is a line per
provider on that axis, ticked at the measured values only; a case of one shape per series is a
bar chart on a categorical axis of its shapes. Throughput axes start at 0; every point or bar
carries the spread of its timed calls (min to max). The ceiling is drawn only where it bounds the
rows (runner.ceiling_pct). Files are written atomically (fastlm.textio.write_atomic).
"""

from __future__ import annotations

import os
import textwrap

from fastlm.bench.peers.registry import engines, providers
from fastlm.bench.peers.workloads import LABELS, PEER_CASES, UNITS, WORKS, floor_ms
from fastlm.bench.result import Result, Row, format_value

SCALES = {"TFLOP/s": (("GFLOP/s", 1e3), ("MFLOP/s", 1e6)), "GB/s": (("MB/s", 1e3),)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    from fastlm.textio import write_atomic

    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return path


def display_unit(values: list[float], unit: str) -> tuple[str, float]:
    """The unit the axis reads best in (as format_value: GFLOP/s when every value is under 1
    TFLOP/s, ...) and the factor that converts to it."""
    top = max((abs(v) for v in values), default=0.0)
    shown, factor = unit, 1.0
    for smaller, f in SCALES.get(unit, ()):
        if top * factor >= 1 or top == 0:
            break
        shown, factor = smaller, f
    return shown, factor


def _variant(r: Row) -> str:
    """The part of a label that is not the x value: "B2 H4 S256 D64 causal" -> "B2 H4 D64 causal"."""
    return " ".join(w for w in r.label.split() if not (w.startswith(("S", "ctx", "M", "R", "N")) and w[-1].isdigit()))


def _spread(r: Row, factor: float) -> tuple[float, float]:
    """(below, above) the row's value: the values of its slowest and fastest calls, as error bars."""
    lo_ms, hi_ms = (r.ms_max, r.ms_min) if r.unit not in ("ms", "ms/token") else (r.ms_min, r.ms_max)
    lo, hi = r.value_at(lo_ms), r.value_at(hi_ms)
    if lo is None or hi is None:
        return 0.0, 0.0
    return max(0.0, (r.value - lo) * factor), max(0.0, (hi - r.value) * factor)


def is_categorical(rows: list[Row]) -> bool:
    """True when no provider's series of one variant has two x values: nothing to draw a line along."""
    xs: dict[tuple[str, str], set] = {}
    for r in rows:
        if r.value is not None:
            xs.setdefault((r.provider, _variant(r)), set()).add(r.x)
    return all(len(v) < 2 for v in xs.values())


def case_figure(res: Result, case: str, rows: list[Row]):
    """The figure of one case (rows of that case): bars on a categorical axis of shapes when each
    series has one shape, else lines along x; y from 0, spread as error bars, the ceiling where it
    bounds the rows, the case's own dtype in the title."""
    plt = _pyplot()
    ok = [r for r in rows if r.value is not None]
    unit = rows[0].unit
    shown, factor = display_unit([r.value for r in ok], unit)
    provs = list(dict.fromkeys(r.provider for r in rows))
    colors = {p: f"C{i}" for i, p in enumerate(provs)}
    fig, ax = plt.subplots(figsize=(8, 5))
    if is_categorical(rows):
        shapes = list(dict.fromkeys(r.label for r in ok))
        drawn = [p for p in provs if any(r.provider == p for r in ok)]
        width = 0.8 / max(1, len(drawn))
        for i, p in enumerate(drawn):
            pts = [(shapes.index(r.label), r) for r in ok if r.provider == p]
            xs = [k + (i - (len(drawn) - 1) / 2) * width for k, _ in pts]
            err = list(zip(*(_spread(r, factor) for _, r in pts), strict=True))
            bars = ax.bar(xs, [r.value * factor for _, r in pts], width, yerr=err, capsize=3, color=colors[p], label=p)
            ax.bar_label(bars, [format_value(r.value * factor, shown) for _, r in pts], label_type="center",
                         fontsize=7, color="white")
        ax.set_xticks(range(len(shapes)), shapes, fontsize=8)
        ax.set_xlabel("shape (one measured shape per provider)")
    else:
        styles = ["-", "--", ":", "-."]
        variants = list(dict.fromkeys(_variant(r) for r in ok))
        for p in provs:
            for vi, var in enumerate(variants):
                pts = sorted(((r.x, r) for r in ok if r.provider == p and _variant(r) == var), key=lambda t: t[0])
                if not pts:
                    continue
                err = list(zip(*(_spread(r, factor) for _, r in pts), strict=True))
                ax.errorbar([x for x, _ in pts], [r.value * factor for _, r in pts], yerr=err, capsize=3,
                            marker="o", color=colors[p], ls=styles[vi % len(styles)],
                            label=p if len(variants) == 1 else f"{p} [{var}]")
        xs = sorted({r.x for r in ok})
        if xs[-1] / max(xs[0], 1e-9) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the measured values, nothing in between
        ax.minorticks_off()
        ax.set_xlabel(rows[0].x_name or "x")
    c = res.ceilings
    if ok and all(r.pct_of_ceiling is not None for r in ok):  # a bound for every row: draw it
        ceiling, what = (c.matmul_tflops, f"measured {c.matmul_dtype} matmul") if unit == "TFLOP/s" else \
            (c.copy_gbs, "measured DRAM copy")
        ax.axhline(ceiling * factor, color="k", ls="--", lw=1, label=f"{what}: {format_value(ceiling, unit)}")
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.15)  # from 0, and room for the legend
    better = {"ms": " (lower is better)", "ms/token": " (lower is better)"}.get(unit, " (higher is better)")
    ax.set_ylabel(shown + better + "; whiskers: min to max of the calls", fontsize=9)
    where = res.env.get("gpu") or f"CPU ({res.env.get('cpu_threads')} threads; small shapes)"
    dtype = rows[0].dtype or res.dtype
    ax.set_title("\n".join(textwrap.wrap(f"fastlm bench: {case}, {dtype}, {where}", 110)), fontsize=9)
    missing = list(dict.fromkeys(f"{r.provider} ({r.status})" for r in rows if r.value is None))
    not_run = textwrap.wrap("not run: " + "; ".join(missing), 150) if missing else []
    if not_run:
        fig.text(0.01, 0.005, "\n".join(not_run[:3]), fontsize=6, va="bottom")
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0.025 * min(3, len(not_run)), 1, 1))
    return fig


def plot(res: Result, out_dir: str) -> list[str]:
    """One PNG per case (case_figure) and the peers' bars; returns the paths written."""
    plt = _pyplot()
    paths = []
    env = res.env
    first = {}
    for name, e in engines().items():
        first.setdefault(e.module, name)
    versions = ", ".join(f"{name} {env.get(name)}" for name, e in engines().items()
                         if e.optional and name == first[e.module])  # an engine run twice (OpenVINO), once
    title = (f"{env.get('cpu_model', 'CPU')}, {env.get('cpu_count')} cores; torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}, {versions}")
    p = peers_plot([r for r in res.rows if r.case in PEER_CASES], res.ceilings.read_gbs,
                   os.path.join(out_dir, f"peers_{res.device}.png"), title, env.get("peers_skipped", []))
    if p:
        paths.append(p)
    by_case: dict[str, list[Row]] = {}
    for r in res.rows:
        if r.case not in PEER_CASES:
            by_case.setdefault(r.case, []).append(r)
    for case, rows in by_case.items():
        if not any(r.value is not None for r in rows):
            continue  # nothing measured: the markdown says why
        fig = case_figure(res, case, rows)
        paths.append(_save(fig, os.path.join(out_dir, f"{case}_{res.device}.png")))
        plt.close(fig)
    return paths


def peers_figure(rows: list[Row], read_gbs: float | None, title: str = "", skipped: list[dict] = ()):
    """Horizontal bars from 0: GPT-2 ms/token per engine (bandwidth floors dashed) and BERT ms per
    engine; each bar the best call, its whisker up to the slowest; engines not run named below."""
    plt = _pyplot()
    cases = [c for c in WORKS if any(r.case == c and r.ms for r in rows)]
    if not cases:
        return None
    engine_of = {p: name for p, name, _ in providers()}
    prec_of = {p: prec for p, _, prec in providers()}
    # the bar's name: the engine's label and its math up to any " (...)" detail
    pretty = {p: f"{engines()[name].label(prec)} {engines()[name].math(prec).split(' (')[0]}"
              for p, name, prec in providers()}
    others = [name for name in engines() if name != "fastlm"]  # fastlm blue, the others C1, C2, ...
    color = {name: "C0" if name == "fastlm" else f"C{others.index(name) + 1}" for name in engines()}
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 3.8), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        rs = [r for r in rows if r.case == case and r.ms]
        rate = UNITS[WORKS[case]] == "tok/s"  # batched decode: tokens/s, the whisker at the slowest call's rate
        vals = [r.value if rate else r.ms for r in rs]
        slow = [1e3 / (r.ms_max or r.ms) if rate else (r.ms_max or r.ms) for r in rs]
        err = ([[max(0.0, v - s) for v, s in zip(vals, slow, strict=True)], [0.0] * len(rs)] if rate else
               [[0.0] * len(rs), [max(0.0, s - v) for v, s in zip(vals, slow, strict=True)]])
        names = [f"{engines()[engine_of[r.provider]].label(prec_of[r.provider])} {r.dtype.split(' (')[0]}" if r.dtype
                 else pretty[r.provider] for r in rs]  # the math the engine said it ran, where it did
        ax.barh(names, vals, xerr=err, capsize=2,
                color=[color[engine_of[r.provider]] for r in rs])
        for i, v in enumerate(vals):
            ax.text(v if rate else max(v, slow[i]), i, f" {v:.1f}", va="center", fontsize=8)  # past the whisker
        if WORKS[case] == "gpt2":
            for prec, ls in (("fp32", "--"), ("bf16", "-."), ("int8", ":")):
                fl = floor_ms(read_gbs, prec)
                if fl:
                    ax.axvline(fl, color="k", ls=ls, lw=1, label=f"{prec} bandwidth floor {fl:.1f} ms")
            if read_gbs:
                ax.legend(fontsize=7, loc="lower right")
        ax.set_xlim(left=0)
        ax.set_xlabel(UNITS[WORKS[case]] + (" (higher" if rate else " (lower") +
                      " is better; bar: best call, whisker: slowest)")
        ax.set_title(LABELS[WORKS[case]], fontsize=10)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    if skipped:
        fig.text(0.01, 0.01, "not run: " + "; ".join(f"{s['engine']} ({s['why']}; install: {s['install']})"
                                                     for s in skipped), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.05 if skipped else 0, 1, 1))
    return fig


def peers_plot(rows: list[Row], read_gbs: float | None, path: str, title: str = "",
               skipped: list[dict] = ()) -> str | None:
    """peers_figure written to `path` (PNG); None when no engine has a measured row."""
    fig = peers_figure(rows, read_gbs, title, skipped)
    if fig is None:
        return None
    _save(fig, path)
    _pyplot().close(fig)
    return path
