"""The generation half of `fastlm bench --suite serve` (fastlm/bench/serve.py): a random-weight GPT-2
small behind `fastlm serve` (fp32 and --quantize int8) and behind llama-cpp-python's server (the
same weights as GGUF F32 and Q8_0: fastlm/bench/serve_peers.py), streamed greedy completions of
`prompt_len`-token prompts and `new_tokens` new tokens at 1, 8 and 32 concurrent streams (closed loop:
each stream sends its next request when the last one ends), and `fastlm generate`'s own TTFT in
process. Each server runs in its own process, one after the other: fastlm fp32, llama.cpp F32,
fastlm int8, llama.cpp Q8_0."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
import time

import numpy as np

from fastlm.bench.serve_proc import fastlm_server, stats


# -- generation --------------------------------------------------------------------------------------
async def _stream_one(ac, url, body):
    """One streamed completion: (TTFT, TPOT, ITLs, end to end, tokens), or None when it failed. Tokens
    are counted one per chunk with text (both servers send one a token; fastlm's usage chunk, asked
    for with stream_options.include_usage, corrects the count where it merged some)."""
    t0 = time.perf_counter()
    times, usage = [], None
    async with ac.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return None
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    usage = ev["usage"]["completion_tokens"]
                if ev["choices"] and ev["choices"][0].get("text"):
                    times.append(time.perf_counter())
    if not times:
        return None
    n = usage or len(times)
    itl = [b - a for a, b in zip(times, times[1:], strict=False)]
    return times[0] - t0, (times[-1] - times[0]) / max(1, n - 1), itl, times[-1] - t0, n


def _prompt_body(kind: str, rng: random.Random, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    """fastlm: token ids, EOS ignored, usage at the end; llama.cpp: a text of prompt_len letters (as
    many tokens: serve_peers.byte_vocab); greedy both."""
    if kind == "llama.cpp":
        from fastlm.bench.serve_peers import LETTERS, letters_prompt

        return {"prompt": letters_prompt([rng.choice(LETTERS) for _ in range(prompt_len)]), "max_tokens": new_tokens,
                "temperature": 0, "stream": True}
    return {"prompt": [rng.randrange(vocab) for _ in range(prompt_len)], "max_tokens": new_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def _gen_load(url, kind, concurrency, rounds, prompt_len, new_tokens, vocab):
    import httpx

    rng = random.Random(concurrency)
    res, fails = [], 0
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=concurrency + 4)) as ac:
        async def worker():
            nonlocal fails
            for _ in range(rounds):
                r = await _stream_one(ac, url, _prompt_body(kind, rng, prompt_len, new_tokens, vocab))
                if r is None:
                    fails += 1
                else:
                    res.append(r)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    row = {"concurrency": concurrency, "requests": len(res), "failed": fails, "wall_s": wall,
           "req_per_s": len(res) / wall, "tok_per_s": sum(r[4] for r in res) / wall}
    row.update(stats("ttft_s", [r[0] for r in res]))
    row.update(stats("tpot_s", [r[1] for r in res]))
    row.update(stats("itl_s", [x for r in res for x in r[2]]))
    row.update(stats("e2e_s", [r[3] for r in res]))
    return row


def _generate_ttft(model_dir: str, prompt_len: int, vocab: int, reps: int = 5, quantize: str | None = None) -> float:
    """fastlm generate's own time to first token (in this process): median over reps."""
    import torch

    import fastlm

    m = fastlm.from_pretrained(model_dir, quantize=quantize)
    g = torch.Generator().manual_seed(0)
    ts = []
    for _ in range(reps + 1):
        ids = torch.randint(0, vocab, (1, prompt_len), generator=g)
        t0 = time.perf_counter()
        next(iter(m.stream(ids, max_new_tokens=2, eos_token_id=[])))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts[1:]))


def gpt2_checkpoint(seed: int = 0) -> tuple[str, int]:
    """A random-weight GPT-2 small (transformers' initialisation, seeded; token embeddings of std 0.5)
    with a word-level tokenizer saved to a temporary folder: (folder, vocab size)."""
    import torch
    import transformers as tf

    tmp = tempfile.mkdtemp(prefix="fastlm-serve-bench-")
    cfg = tf.GPT2Config()  # GPT-2 small
    torch.manual_seed(seed)
    model = tf.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # token embeddings (and the tied head) wider than transformers' 0.02 init: logits
        model.transformer.wte.weight.normal_(0.0, 0.5)  # far apart, so greedy tokens do not hang on rounding
    model.save_pretrained(tmp)
    _word_tokenizer(cfg.vocab_size).save_pretrained(tmp)
    return tmp, cfg.vocab_size


def _gen_servers(model_dir, threads, n_ctx, slots, int8):
    """(label, kind, start) for each server, fastlm and llama.cpp alternating (fp32, then int8)."""
    from fastlm.bench import serve_peers as sp

    args = ("--max-model-len", str(n_ctx), "--max-num-seqs", str(slots))
    out = []
    for q in ((None, "int8") if int8 else (None,)):
        out.append(("fastlm serve" + (f" --quantize {q}" if q else " fp32"), "fastlm",
                    lambda q=q: fastlm_server(model_dir, *args, *(("--quantize", q) if q else ()), threads=threads)))
        fmt = "Q8_0" if q else "F32"
        out.append((f"llama.cpp server {fmt}", "llama.cpp",
                    lambda q=q: sp.llama_server(sp.llama_gguf(model_dir, q or "fp32"), threads, n_ctx)))
    return out


def bench_generation(out: list, threads: int, streams=(1, 8, 32), rounds: int = 1, prompt_len: int = 128,
                     new_tokens: int = 64, one_stream_rounds: int = 5, int8: bool = True):
    from fastlm.bench import serve_peers as sp

    tmp, vocab = gpt2_checkpoint()
    n_ctx = prompt_len + new_tokens + 8
    llama_why = sp.llama_missing()
    llama_ver = None if llama_why else sp.llama_version()
    for label, kind, start in _gen_servers(tmp, threads, n_ctx, max(streams), int8):
        case = "gpt2_small_stream" + ("_int8" if "int8" in label or "Q8_0" in label else "")
        if kind == "llama.cpp" and llama_why:
            out.append({"case": case, "provider": label, "skipped": llama_why})
            continue
        try:
            srv = start().wait()
        except Exception as e:  # noqa: BLE001 - a peer that cannot start is a skipped row, not a crash
            out.append({"case": case, "provider": label, "skipped": f"{type(e).__name__}: {str(e)[-300:]}"})
            continue
        try:
            if kind == "llama.cpp":
                label = f"{label} ({llama_ver})"
                if "F32" in label:
                    sp.llama_check_greedy(srv.url, tmp)
            asyncio.run(_gen_load(srv.url, kind, 1, 1, 16, 4, vocab))  # warm
            for c in streams:
                row = asyncio.run(_gen_load(srv.url, kind, c, one_stream_rounds if c == 1 else rounds, prompt_len,
                                            new_tokens, vocab))
                out.append({"case": case, "provider": label, **row})
        except Exception as e:  # noqa: BLE001
            out.append({"case": case, "provider": label, "skipped": f"failed: {type(e).__name__}: {str(e)[:300]}"})
        finally:
            srv.stop()
    out.append({"case": "gpt2_small_generate_ttft", "provider": "fastlm generate (in-process)", "concurrency": 1,
                "ttft_s_p50": _generate_ttft(tmp, prompt_len, vocab)})
    shutil.rmtree(tmp, ignore_errors=True)


def _word_tokenizer(vocab: int):
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, eos_token=f"w{vocab - 1}", unk_token="w0")
