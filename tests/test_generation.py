"""Generation against transformers' generate (greedy, fp32, CPU), sampling, stop and bad input."""

import gc
import os

import pytest
import torch
import transformers as tf

import fastlm
from fastlm.cache import StaticKVCache

CONFIGS = {
    "h3_d32": dict(n_layer=2, n_head=3, n_embd=96, vocab_size=101, n_positions=96),
    "h2_d80_untied": dict(n_layer=3, n_head=2, n_embd=160, vocab_size=257, n_positions=80, tie_word_embeddings=False),
}


def pair(name):
    # initializer_range 0.4: with the default 0.02 greedy decoding repeats one token and
    # a broken decode could still "match"
    cfg = tf.GPT2Config(**CONFIGS[name], initializer_range=0.4, bos_token_id=0, eos_token_id=0)
    hf = tf.GPT2LMHeadModel(cfg).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf, fastlm.from_pretrained(hf)


def hf_generate(hf, ids, mask=None, n=32, **kw):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)


def assert_diverse(tokens, at_least=8):
    assert len(set(tokens.flatten().tolist())) >= at_least, "reference output is too repetitive to be a test"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_single_prompt_equals_transformers(name):
    hf, model = pair(name)
    ids = torch.randint(1, hf.config.vocab_size, (1, 11))
    expect = hf_generate(hf, ids)
    assert_diverse(expect[:, 11:])
    assert torch.equal(model.generate(ids, max_new_tokens=32), expect)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_batch_of_different_lengths_equals_transformers(name, side):
    hf, model = pair(name)
    V = hf.config.vocab_size
    lens = [13, 4, 9]
    S = max(lens)
    ids = torch.zeros(3, S, dtype=torch.long)
    mask = torch.zeros(3, S, dtype=torch.long)
    prompts = [torch.randint(1, V, (n,)) for n in lens]
    for b, p in enumerate(prompts):
        sl = slice(S - len(p), S) if side == "left" else slice(0, len(p))
        ids[b, sl], mask[b, sl] = p, 1
    got = model.generate(ids, mask, max_new_tokens=32)
    assert torch.equal(got[:, :S], ids)
    for b, p in enumerate(prompts):  # each equals transformers on its own unpadded prompt
        expect = hf_generate(hf, p[None])
        assert_diverse(expect[:, len(p):])
        assert torch.equal(got[b, S:], expect[0, len(p):]), f"sequence {b}"
    if side == "left":  # and the batch as transformers runs it
        assert torch.equal(got, hf_generate(hf, ids, mask))


def test_eos_stops_and_pads_like_transformers():
    hf, model = pair("h3_d32")
    ids = torch.randint(1, 101, (2, 7))
    free = hf_generate(hf, ids, n=24)
    eos = int(free[0, 7 + 5])  # a token sequence 0 makes at step 5
    expect = hf_generate(hf, ids, n=24, eos_token_id=eos, pad_token_id=0)
    got = model.generate(ids, max_new_tokens=24, eos_token_id=eos)
    model.config.pad_token_id = 0
    try:
        got_pad0 = model.generate(ids, max_new_tokens=24, eos_token_id=eos)
    finally:
        model.config.pad_token_id = None
    assert torch.equal(got_pad0, expect)
    assert got.shape == expect.shape  # stops at the step the last sequence ended


def test_stream_yields_the_generated_tokens():
    _, model = pair("h3_d32")
    ids = torch.randint(1, 101, (2, 5))
    steps = list(model.stream(ids, max_new_tokens=10))
    assert len(steps) == 10 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), model.generate(ids, max_new_tokens=10)[:, 5:])


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    _, model = pair("h3_d32")
    ids = torch.randint(1, 101, (2, 6))
    a = model.generate(ids, max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, seed=123)
    b = model.generate(ids, max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, seed=123)
    c = model.generate(ids, max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(ids, max_new_tokens=16)
    assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=True, top_k=1, seed=5), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=True, top_p=1e-6, seed=5), greedy)


def test_cache_full_edge():
    hf, model = pair("h3_d32")  # 96 positions
    ids = torch.randint(1, 101, (1, 90))
    out = model.generate(ids, max_new_tokens=6)  # exactly fills the positions
    assert out.shape == (1, 96)
    assert torch.equal(out, hf_generate(hf, ids, n=6))
    with pytest.raises(ValueError, match="exceeds the model's 96 positions"):
        model.generate(ids, max_new_tokens=7)


def test_generate_bad_input():
    _, model = pair("h3_d32")
    ids = torch.randint(1, 101, (2, 5))
    cases = [
        (dict(max_new_tokens=0), "max_new_tokens must be"),
        (dict(max_new_tokens=4, do_sample=True, top_p=-0.1), "top_p must lie in"),  # 0 is greedy, as in transformers
        (dict(max_new_tokens=4, do_sample=True, top_p=1.5), "top_p must lie in"),
        (dict(max_new_tokens=4, do_sample=True, top_k=-1), "top_k must be"),
        (dict(max_new_tokens=4, do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(max_new_tokens=4, eos_token_id=500), "eos_token_id must be"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model.generate(ids, **kw)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model.generate(ids, torch.ones(2, 4), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids is empty"):
        model.generate(ids[:0], max_new_tokens=2)
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        model.generate(ids, torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]), max_new_tokens=2)


def test_generation_on_the_triton_kernels(device):
    """Prefill (fused attention) and decode (flash-decoding) on the Triton kernels."""
    hf, _ = pair("h3_d32")
    model = fastlm.from_pretrained(hf, device=device)
    ids = torch.randint(1, 101, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    expect = hf_generate(hf, ids, mask, n=12)
    with fastlm.use_backend("triton"):
        got = model.generate(ids.to(device), mask.to(device), max_new_tokens=12)
    assert torch.equal(got.cpu(), expect)


def test_cache_update_writes_by_index():
    c = StaticKVCache(1, 2, 3, 4, 16, torch.float32, torch.device("cpu"))
    k = torch.randn(2, 3, 1, 4)
    c.append(0, k, -k, torch.tensor([5, 9], dtype=torch.int32))
    assert torch.equal(c.k[0, 0, :, 5], k[0, :, 0]) and torch.equal(c.k[0, 1, :, 9], k[1, :, 0])
    assert torch.equal(c.v[0, 1, :, 9], -k[1, :, 0])
    assert c.k[0, 0, :, 9].abs().sum() == 0 and c.k[0, 1, :, 5].abs().sum() == 0


def test_memory_stays_flat_over_200_calls():
    _, model = pair("h3_d32")
    ids = torch.randint(1, 101, (2, 6))

    def rss():
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    for _ in range(20):
        model.generate(ids, max_new_tokens=4)
    gc.collect()
    before = rss()
    for _ in range(200):
        model.generate(ids, max_new_tokens=4)
    gc.collect()
    assert rss() <= before * 1.05
    assert len(model._fastlm_decoders) == 1  # one cache reused


def test_batch_buckets_share_one_decoder(monkeypatch):
    """With buckets (as under CUDA graphs) batches 3 and 4 share one decoder; the idle row of the
    bucket changes nothing."""
    monkeypatch.setenv("FASTLM_BATCH_BUCKETS", "1")
    hf, model = pair("h3_d32")
    ids = torch.randint(1, 101, (3, 8))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    got = model.generate(ids, mask, max_new_tokens=12)
    assert torch.equal(got, hf_generate(hf, ids, mask, n=12))
    model.generate(torch.randint(1, 101, (4, 8)), max_new_tokens=12)
    assert [k[0] for k in model._fastlm_decoders] == [4]


def test_cache_is_freed_with_the_model():
    import weakref

    _, model = pair("h3_d32")
    model.generate(torch.randint(1, 101, (1, 5)), max_new_tokens=3)
    cache_k = weakref.ref(next(iter(model._fastlm_decoders.values())).cache.k)
    del model
    assert cache_k() is None  # freed at once, no garbage collection needed


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copy_after_generate_decodes_with_its_own_weights(how):
    """A copy of a model that has generated (deepcopy, or torch.save / torch.load of the whole
    model) decodes with its own weights: it neither reuses the original's decoders (which hold the
    original weakly and would run its weights, or fail once it is gone) nor refuses to pickle."""
    import copy
    import io

    hf, model = pair("h3_d32")
    ids = torch.randint(1, 101, (1, 6))
    model.generate(ids, max_new_tokens=3)  # the original now holds a decoder
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    hf2, other = pair("h3_d32")
    twin.load_state_dict(other.state_dict())  # the copy's weights change; the original's do not
    want = hf_generate(hf2, ids, n=16)
    assert_diverse(want[0, 6:])
    assert torch.equal(twin.generate(ids, max_new_tokens=16), want)
    del model
    gc.collect()
    assert torch.equal(twin.generate(ids, max_new_tokens=16), want)  # the original gone: still its own


def test_interleaved_streams_and_threads_on_one_model():
    """Two generations in flight on one model at once (two model.stream() iterators advanced in
    turn, or two threads) each get their own cache: they shared the model's decoder (cache,
    positions, token buffer) and wrote over each other's rows (wrong tokens, then an IndexError)."""
    import threading

    hf, model = pair("h3_d32")
    prompts = [torch.randint(1, 101, (1, 5)), torch.randint(1, 101, (1, 7))]
    want = [hf_generate(hf, p, n=20) for p in prompts]
    for w, p in zip(want, prompts, strict=True):
        assert_diverse(w[0, p.shape[1]:])
    streams = [model.stream(p, max_new_tokens=20) for p in prompts]
    got = [[], []]
    for _ in range(20):
        for i, st in enumerate(streams):
            got[i].append(next(st))
    for i, p in enumerate(prompts):
        assert torch.equal(torch.cat([p, torch.stack(got[i], 1)], 1), want[i])
    results = [[], []]

    def work(i):
        for _ in range(4):
            results[i].append(torch.equal(model.generate(prompts[i], max_new_tokens=20), want[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[True] * 4, [True] * 4]
    assert len(model._fastlm_decoders) <= 2  # in-flight extras are not kept
