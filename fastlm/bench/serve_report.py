"""The table and the latency-vs-load plot of `fastlm bench --suite serve` (fastlm/bench/serve.py), from
its rows alone: generation (GPT-2 small streams), embeddings (MiniLM open / closed loop, overload),
the issue's targets as ratios measured in the same run, and the soak's RSS."""

from __future__ import annotations

import math


def _cell(s) -> str:
    return str(s).replace("\n", " ").replace("|", "/")


def _ms(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{1e3 * v:.0f}"


def _find(rows, case, provider_start, **kw):
    for r in rows:
        if (r["case"] == case and r["provider"].startswith(provider_start) and "skipped" not in r
                and all(r.get(k) == v for k, v in kw.items())):
            return r
    return None


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each a line: the measured ratio and whether it is met (or why it is unknown)."""
    out = []
    for case, ours, theirs in (("gpt2_small_stream", "fastlm serve fp32", "llama.cpp server F32"),
                               ("gpt2_small_stream_int8", "fastlm serve --quantize int8", "llama.cpp server Q8_0")):
        a, b = _find(rows, case, ours, concurrency=32), _find(rows, case, theirs, concurrency=32)
        if a and b:
            x = a["tok_per_s"] / b["tok_per_s"]
            out.append(f"- 32 streams, {ours} / {theirs}: {a['tok_per_s']:.0f} / {b['tok_per_s']:.0f} tok/s = "
                       f"**{x:.2f}x** (target >= 1.5x: {'met' if x >= 1.5 else 'NOT met'})")
        else:
            out.append(f"- 32 streams, {ours} vs {theirs}: not measured (a row is missing or skipped)")
    a = _find(rows, "gpt2_small_stream", "fastlm serve fp32", concurrency=1)
    g = _find(rows, "gpt2_small_generate_ttft", "fastlm generate")
    if a and g:
        x = a["ttft_s_p50"] / g["ttft_s_p50"]
        out.append(f"- TTFT p50 at one stream, fastlm serve / fastlm generate: {_ms(a['ttft_s_p50'])} / "
                   f"{_ms(g['ttft_s_p50'])} ms = **{x:.2f}** (target <= 1.10: {'met' if x <= 1.10 else 'NOT met'})")
    a, b = _find(rows, "minilm_open_loop", "fastlm serve", rate_rps=50), _find(rows, "minilm_open_loop", "infinity",
                                                                                rate_rps=50)
    if a and b:
        out.append(f"- MiniLM 50 rps open loop p99, fastlm / infinity-emb: {_ms(a['latency_s_p99'])} / "
                   f"{_ms(b['latency_s_p99'])} ms ({'met' if a['latency_s_p99'] < b['latency_s_p99'] else 'NOT met'})")
    a, b = _find(rows, "minilm_closed_loop", "fastlm serve"), _find(rows, "minilm_closed_loop", "infinity")
    if a and b:
        ok = "met" if a["req_per_s"] > b["req_per_s"] else "NOT met"
        out.append(f"- MiniLM max sustainable rps (16 clients, closed loop), fastlm / infinity-emb: "
                   f"{a['req_per_s']:.1f} / {b['req_per_s']:.1f} ({ok})")
    # saturation: fastlm's closed-loop rate (what it sustains); an open loop offered below it must
    # lose nothing, one above it may answer 429 (the bounded queue) but never a timeout or a 500
    mine = [r for r in rows if r["case"] in ("minilm_open_loop", "minilm_overload") and "skipped" not in r
            and r["provider"].startswith("fastlm")]
    closed = _find(rows, "minilm_closed_loop", "fastlm serve")
    if mine and closed:
        sat = closed["req_per_s"]
        below = [r for r in mine if r["rate_rps"] < sat]
        other = sum(n for r in mine for c, n in r.get("codes", {}).items() if c not in ("200", "429"))
        n429 = sum(r.get("codes", {}).get("429", 0) for r in mine if r["rate_rps"] >= sat)
        out.append(f"- fastlm below saturation ({sat:.1f} rps, its closed loop): "
                   f"{sum(r['failed'] for r in below)} failed of {sum(sum(r.get('codes', {}).values()) for r in below)}"
                   f" (target 0); above it: {n429} answered 429, {other} other failures (target: only 429s)")
    return out


def markdown(rows: list[dict], meta: dict | None = None) -> str:
    meta = meta or {}
    L = []
    if meta:
        la = ", ".join(f"{x:.1f}" for x in meta.get("load_avg", ()))
        L += [f"{meta.get('threads')} threads per server, {meta.get('cpu_count')} CPUs, load average at the end {la}, "
              f"run {meta.get('wall_s')} s{' (--quick)' if meta.get('quick') else ''}. Each server in its own process "
              "on 127.0.0.1, one after the other.", ""]
    L += ["## Targets (ratios from this run)", "", *targets(rows), "", "## GPT-2 small, streamed completions", "",
          "| case | provider | streams | req/s | tok/s | TTFT p50, p90, p99 (ms) | TPOT p50 (ms) | ITL p99 (ms) "
          "| e2e p50 (ms) | failed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not r["case"].startswith("gpt2"):
            continue
        if "skipped" in r:
            L.append(f"| {r['case']} | {r['provider']} | - | | | skipped: {_cell(r['skipped'])} | | | | |")
        elif r["case"] == "gpt2_small_generate_ttft":
            L.append(f"| {r['case']} | {r['provider']} | 1 | | | {_ms(r['ttft_s_p50'])} | | | | |")
        else:
            L.append(f"| {r['case']} | {r['provider']} | {r['concurrency']} | {r['req_per_s']:.2f} | "
                     f"{r['tok_per_s']:.1f} | {_ms(r['ttft_s_p50'])}, {_ms(r['ttft_s_p90'])}, {_ms(r['ttft_s_p99'])} | "
                     f"{_ms(r['tpot_s_p50'])} | {_ms(r['itl_s_p99'])} | {_ms(r['e2e_s_p50'])} | {r['failed']} |")
    L += ["", "## all-MiniLM-L6-v2 embeddings, requests of 1-32 sentences", "",
          "| case | provider | load | req/s | sent/s (server CPU ms / sentence) | latency p50, p90, p99, max (ms) "
          "| failed (codes) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not r["case"].startswith("minilm"):
            continue
        if "skipped" in r:
            L.append(f"| {r['case']} | {r['provider']} | - | | | skipped: {_cell(r['skipped'])} | |")
        elif r["case"] == "minilm_closed_loop":
            L.append(f"| {r['case']} | {r['provider']} | {r['clients']} clients | {r['req_per_s']:.1f} | "
                     f"{r['sentences_per_s']:.0f} ({r.get('server_cpu_ms_per_sentence', float('nan')):.1f}) | | "
                     f"{r['failed']} |")
        else:
            L.append(f"| {r['case']} | {r['provider']} | {r['rate_rps']} rps open | {r['achieved_rps']:.1f} | | "
                     f"{_ms(r['latency_s_p50'])}, {_ms(r['latency_s_p90'])}, {_ms(r['latency_s_p99'])}, "
                     f"{_ms(r.get('max_latency_s'))} | {r['failed']} {r['codes']} |")
    soaks = [r for r in rows if r["case"] == "soak"]
    if soaks:
        L += ["", "## Soak (fastlm serve; RSS in MiB)", "",
              "| task | requests (+ warm-up) | outcomes | RSS start | after warm-up | end | growth | "
              "MiB / 1000 requests |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in soaks:
            L.append(f"| {r['task']} | {r['requests']} (+{r['warmup_requests']}) | {r['counts']} | "
                     f"{r['rss_start_mib']} | {r['rss_warm_mib']} | {r['rss_end_mib']} | {r['growth_mib']:+} | "
                     f"{r['growth_mib'] * 1000 / max(1, r['requests']):+.1f} |")
    return "\n".join(L) + "\n"


def plot(rows: list[dict], path: str) -> str | None:
    """Latency vs load: MiniLM latency p50 / p99 against the offered rate, GPT-2 TPOT p50 and total
    tokens/s against the concurrent streams, one line per server. Returns the path (None without
    matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastlm.textio import write_atomic

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    series: dict = {}
    for r in rows:
        if "skipped" not in r and r["case"] == "minilm_open_loop":
            series.setdefault(r["provider"], []).append(r)
    for prov, rs in series.items():
        x = [r["rate_rps"] for r in rs]
        line, = ax[0].plot(x, [1e3 * r["latency_s_p99"] for r in rs], "o-", label=f"{prov} p99")
        ax[0].plot(x, [1e3 * r["latency_s_p50"] for r in rs], "o--", color=line.get_color(), label=f"{prov} p50")
    ax[0].set(xlabel="offered load (requests/s, 1-32 sentences each)", ylabel="latency (ms)", yscale="log",
              title="all-MiniLM-L6-v2 embeddings, open loop")
    gens: dict = {}
    for r in rows:
        if "skipped" not in r and r["case"].startswith("gpt2_small_stream"):
            gens.setdefault(r["provider"], []).append(r)
    for prov, rs in gens.items():
        x = [r["concurrency"] for r in rs]
        ax[1].plot(x, [1e3 * r["tpot_s_p50"] for r in rs], "o-", label=prov)
        ax[2].plot(x, [r["tok_per_s"] for r in rs], "o-", label=prov)
    streams = sorted({r["concurrency"] for rs in gens.values() for r in rs})
    ax[1].set(xlabel="concurrent streams", ylabel="time per output token p50 (ms)", xscale="log",
              title="GPT-2 small, streamed greedy completions")
    ax[2].set(xlabel="concurrent streams", ylabel="total tokens/s", xscale="log", ylim=(0, None),
              title="GPT-2 small throughput")
    for a in ax[1:]:
        if streams:
            a.set_xticks(streams, [str(x) for x in streams])
            a.minorticks_off()
    for a in ax:
        if a.lines:
            a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
