"""torch.ops.fastlm.gpt2_decode_cpu (csrc/decode_cpu.cpp): the whole GPT-2 decode step for one
sequence in one C++ call. Against the op-by-op decode step (same kernels, so equal to fp32
rounding), against transformers' greedy generate (fp32 and int8 on the dequantized weights),
with NaN-poisoned cache rows past the length, and bad input (clear errors, cache untouched)."""

import pytest
import torch
import transformers as tf

import fastlm
from fastlm import _ext
from fastlm.cache import StaticKVCache
from fastlm.testing import poison_

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"fastlm._C not built: {_ext.LOAD_ERROR}")

CONFIGS = {
    # head dim 32, d_ff 200 (not a multiple of the 16-channel panel), scaled by inverse layer index
    "h3_d32": dict(n_layer=2, n_head=3, n_embd=96, n_inner=200, vocab_size=101, n_positions=128,
                   scale_attn_by_inverse_layer_idx=True),
    # head dim 80, untied head, GELU (erf) instead of gelu_new
    "h2_d80_untied": dict(n_layer=3, n_head=2, n_embd=160, vocab_size=257, n_positions=128,
                          tie_word_embeddings=False, activation_function="gelu"),
    # head dim 25 (odd), vocab 33
    "h4_d25": dict(n_layer=1, n_head=4, n_embd=100, vocab_size=33, n_positions=64),
}


def hf_model(name):
    cfg = tf.GPT2Config(**CONFIGS[name], initializer_range=0.4, bos_token_id=0, eos_token_id=0)
    hf = tf.GPT2LMHeadModel(cfg).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def prefilled(model, ids, capacity):
    """A fresh cache (poisoned past the prompt) holding the prompt's keys and values."""
    cfg = model.config
    cache = StaticKVCache(cfg.n_layer, 1, cfg.n_head, cfg.n_embd // cfg.n_head, capacity, torch.float32, "cpu")
    poison_(cache.k)
    poison_(cache.v)
    with torch.inference_mode():
        model.prefill(ids, None, cache)
    return cache


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_step_equals_op_by_op(name, quantize, monkeypatch):
    model = fastlm.from_pretrained(hf_model(name), quantize=quantize)
    V, T = model.config.vocab_size, 7
    ids = torch.randint(0, V, (1, T))
    fused_cache, ops_cache = prefilled(model, ids, 40), prefilled(model, ids, 40)
    tok = torch.randint(0, V, (1,))
    for step in range(5):  # positions T .. T + 4, each step's keys land in both caches
        pos = torch.tensor([T + step], dtype=torch.int32)
        with torch.inference_mode():
            assert model._cpu_decode_params(torch.zeros(1, 1, model.config.n_embd), fused_cache) is not None
            fused = model.decode_step(tok, pos, fused_cache, T + step + 1)
            with monkeypatch.context() as m:
                m.setattr(type(model), "_cpu_decode_params", lambda *a: None)  # the op-by-op path
                ref = model.decode_step(tok, pos, ops_cache, T + step + 1)
        assert fused.shape == (1, V) and torch.isfinite(fused).all()
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
        n = T + step + 1
        torch.testing.assert_close(fused_cache.k[:, :, :, :n], ops_cache.k[:, :, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_cache.v[:, :, :, :n], ops_cache.v[:, :, :, :n], rtol=1e-5, atol=1e-5)
        assert fused_cache.k[:, :, :, n:].isnan().all()  # nothing written past the new row
        tok = fused.argmax(-1)


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_transformers(name, quantize):
    hf = hf_model(name)
    model = fastlm.from_pretrained(hf, quantize=quantize)
    if quantize == "int8":  # transformers on the weights the int8 model computes with
        with torch.no_grad():
            for hb, b in zip(hf.transformer.h, model.h, strict=True):  # Conv1D keeps (in, out)
                for conv, lin in ((hb.attn.c_attn, b.attn.c_attn), (hb.attn.c_proj, b.attn.c_proj),
                                  (hb.mlp.c_fc, b.mlp.c_fc), (hb.mlp.c_proj, b.mlp.c_proj)):
                    conv.weight.copy_(lin.dequantized().t())
            hf.lm_head.weight.copy_(model.lm_head.dequantized())  # tied: the embedding follows, as in fastlm
    ids = torch.randint(1, hf.config.vocab_size, (1, 9))
    with torch.no_grad():
        expect = hf.generate(ids, max_new_tokens=24, do_sample=False)
    assert len(set(expect[0, 9:].tolist())) >= 5, "reference output is too repetitive to be a test"
    assert model._cpu_decode_params(torch.zeros(1, 1, model.config.n_embd),
                                    prefilled(model, ids, 40)) is not None  # the fused path runs
    assert torch.equal(model.generate(ids, max_new_tokens=24), expect)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_fused_step_follows_swapped_modules_and_tensors(quantize, monkeypatch):
    """After a first fused step, replace what the step reads without touching the projection
    weights: LayerNorm modules, a bias tensor, an attention scale. The fused step must read the new
    ones (it cached the old parameter list, keyed by the weights only, and kept using the old
    LayerNorms and biases). A LayerNorm with its own eps runs op by op (the op takes one eps)."""
    model = fastlm.from_pretrained(hf_model("h3_d32"), quantize=quantize)
    C, V, T = model.config.n_embd, model.config.vocab_size, 5
    ids = torch.randint(0, V, (1, T))
    tok, pos = torch.randint(0, V, (1,)), torch.tensor([T], dtype=torch.int32)

    def step(fused):
        cache = prefilled(model, ids, 16)
        with torch.inference_mode(), monkeypatch.context() as m:
            if not fused:
                m.setattr(type(model), "_cpu_decode_params", lambda *a: None)  # the op-by-op path
            return model.decode_step(tok, pos, cache, T + 1)

    torch.testing.assert_close(step(True), step(False), rtol=1e-5, atol=1e-5)  # the list is now cached
    with torch.no_grad():
        for b in model.h:
            b.ln_1 = torch.nn.LayerNorm(C, eps=model.ln_f.eps)
            b.ln_1.weight.normal_()
            b.ln_1.bias.normal_()
        model.ln_f = torch.nn.LayerNorm(C, eps=model.ln_f.eps)
        model.ln_f.bias.normal_()
        model.h[1].attn.c_proj.bias = torch.randn(C)  # a new tensor, not an in-place change
        model.h[0].attn.scale = 0.05
    assert model._cpu_decode_params(torch.zeros(1, 1, C), prefilled(model, ids, 16)) is not None
    want = step(False)
    torch.testing.assert_close(step(True), want, rtol=1e-5, atol=1e-5)
    model.h[1].ln_2 = torch.nn.LayerNorm(C, eps=1e-2)  # not the model's eps: op by op
    assert model._cpu_decode_params(torch.zeros(1, 1, C), prefilled(model, ids, 16)) is None
    assert not torch.allclose(step(True), want)


def test_not_used_where_it_does_not_apply():
    model = fastlm.from_pretrained(hf_model("h3_d32"))
    h = torch.zeros(1, 1, model.config.n_embd)
    cache = prefilled(model, torch.randint(0, 101, (1, 3)), 16)
    assert model._cpu_decode_params(h, cache) is not None
    with fastlm.use_backend("torch"):  # a forced backend runs op by op
        assert model._cpu_decode_params(h, cache) is None
    assert model._cpu_decode_params(h.double(), cache) is None
    model.decode_layout_(pack=False)  # plain nn.Linear projections: op by op, and rebuilt after a relayout
    assert model._cpu_decode_params(h, cache) is None
    model.decode_layout_()
    assert model._cpu_decode_params(h, cache) is not None


def _args(model, cache, kv_len=4):
    h = torch.randn(1, 1, model.config.n_embd)
    params = model._cpu_decode_params(h, cache)
    return [h, list(params), cache.k, cache.v, kv_len, list(model._attn_scales), model.config.vocab_size,
            model.ln_f.eps, model.h[0].mlp.activation]


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a.__setitem__(4, 0), ValueError, r"kv_len must be in \[1, 16\]"),
        (lambda a: a.__setitem__(4, 17), ValueError, r"kv_len must be in \[1, 16\]"),
        (lambda a: a.__setitem__(1, a[1][:-1]), ValueError, "params must hold"),
        (lambda a: a[1].__setitem__(2, a[1][2][:, :-1].contiguous()), ValueError, "c_attn weight must be"),
        (lambda a: a[1].__setitem__(16 + 1, None), ValueError, "ln_1 bias is missing"),
        (lambda a: a.__setitem__(0, a[0].double()), TypeError, "h must be float32"),
        (lambda a: a.__setitem__(0, torch.randn(2, 1, a[0].shape[-1])), ValueError, "one CPU row"),
        (lambda a: a.__setitem__(8, "relu"), ValueError, "activation must be"),
        (lambda a: a.__setitem__(5, a[5][:1]), ValueError, "params must hold"),
        (lambda a: (a.__setitem__(5, []), a.__setitem__(1, a[1][-5:])), ValueError, "one attention scale per layer"),
        # wrong ranks where the op reads a size: a clear error naming the argument, not an IndexError
        (lambda a: a.__setitem__(0, torch.tensor(1.0)), ValueError, "one CPU row"),
        (lambda a: a[1].__setitem__(10, torch.tensor(1.0)), ValueError, "c_fc weight must be"),
        (lambda a: a[1].__setitem__(13, torch.zeros(5)), ValueError, "mlp.c_proj weight must be"),
        (lambda a: a[1].__setitem__(10, None), ValueError, "c_fc weight is missing"),
        # non-finite constants would make NaN logits and write NaN keys into the cache
        (lambda a: a.__setitem__(7, float("nan")), ValueError, "eps must be"),
        (lambda a: a.__setitem__(7, -1.0), ValueError, "eps must be"),
        (lambda a: a.__setitem__(5, [float("inf")] * len(a[5])), ValueError, "scales must be finite"),
    ],
)
def test_bad_input_raises_and_leaves_the_cache(change, exc, match):
    model = fastlm.from_pretrained(hf_model("h3_d32"))
    cache = prefilled(model, torch.randint(0, 101, (1, 3)), 16)
    before_k, before_v = cache.k.clone(), cache.v.clone()
    args = _args(model, cache)
    change(args)
    with pytest.raises(exc, match=match):
        torch.ops.fastlm.gpt2_decode_cpu(*args)
    assert torch.equal(cache.k.nan_to_num(7.0), before_k.nan_to_num(7.0))
    assert torch.equal(cache.v.nan_to_num(7.0), before_v.nan_to_num(7.0))


def test_cache_dtype_and_shape_checked():
    model = fastlm.from_pretrained(hf_model("h3_d32"))
    cache = prefilled(model, torch.randint(0, 101, (1, 3)), 16)
    args = _args(model, cache)
    args[2] = cache.k.double()
    with pytest.raises(TypeError, match="KV cache must be float32"):
        torch.ops.fastlm.gpt2_decode_cpu(*args)
    args = _args(model, cache)
    args[3] = cache.v[:, :, :2]
    with pytest.raises(ValueError, match="KV cache must be contiguous"):
        torch.ops.fastlm.gpt2_decode_cpu(*args)


def test_zero_width_model_is_refused():
    """n_embd 0: every size check passes on empty tensors, and the attention split by head dim
    divided by zero (SIGFPE); now a ValueError before any work."""
    L, V, F = 2, 5, 16
    panels = lambda n, k, dt=torch.float32: torch.zeros(-(-n // 16), k, 16, dtype=dt)  # noqa: E731
    layer = [torch.ones(0), torch.zeros(0), panels(0, 0), None, None, panels(0, 0), None, None,
             torch.ones(0), torch.zeros(0), panels(F, 0), None, None, panels(0, F), None, None]
    params = layer * L + [torch.ones(0), torch.zeros(0), panels(V, 0), None, None]
    k, v = torch.zeros(L, 1, 2, 8, 0), torch.zeros(L, 1, 2, 8, 0)
    with pytest.raises(ValueError, match="C >= 1"):
        torch.ops.fastlm.gpt2_decode_cpu(torch.zeros(1, 1, 0), params, k, v, 3, [1.0] * L, V, 1e-5, "gelu")


def test_fake():
    model = fastlm.from_pretrained(hf_model("h4_d25"))
    cache = prefilled(model, torch.randint(0, 33, (1, 3)), 16)
    torch.library.opcheck(torch.ops.fastlm.gpt2_decode_cpu, tuple(_args(model, cache)),
                          test_utils=("test_schema", "test_faketensor"))


def test_profile_counts_steps_and_every_op():
    """torch.ops.fastlm.gpt2_decode_profile: off by default (a step adds nothing), on it counts steps and
    sums each op kind's wall time (every GEMV and the attention take time), reset zeroes it; a bad
    command is a ValueError naming it."""
    prof = torch.ops.fastlm.gpt2_decode_profile
    model = fastlm.from_pretrained(hf_model("h3_d32"), device="cpu")
    ids = torch.randint(1, 101, (1, 5), generator=torch.Generator().manual_seed(3))
    prof("off")
    prof("reset")
    model.generate(ids, max_new_tokens=3)
    assert prof("") == [0] * 11
    prof("on")
    try:
        model.generate(ids, max_new_tokens=4)  # 3 decode steps after the prefill's token
    finally:
        prof("off")
    r = prof("")
    assert r[0] == 3 and len(r) == 11 and all(v >= 0 for v in r)
    assert all(r[i] > 0 for i in (2, 4, 5, 7, 8, 10)), r  # c_attn, attention, attn.c_proj, c_fc, mlp.c_proj, lm_head
    assert prof("reset") == [0] * 11
    with pytest.raises(ValueError, match="gpt2_decode_profile: cmd must be"):
        prof("start")


def test_int8_step_one_arena_and_threads_agree():
    """quantize="int8" puts every decode projection's pair panels in one huge-page run (step order,
    fastlm.linear.share_arena_); the step's GEMVs are large enough here to be shared between 2 threads,
    and 2 threads, 1 thread and the int8 software prefetch on / off give the same logits bit for bit,
    equal to the step on separate allocations."""
    cfg = tf.GPT2Config(n_layer=2, n_head=4, n_embd=256, n_inner=1024, vocab_size=1999, n_positions=64,
                        initializer_range=0.4, bos_token_id=0, eos_token_id=0)
    model = fastlm.from_pretrained(tf.GPT2LMHeadModel(cfg).eval(), quantize="int8")
    lins = model.decode_linears()
    assert len({lin.qweight.untyped_storage().data_ptr() for lin in lins}) == 1
    ids = torch.randint(0, 1999, (1, 5))
    prev = torch.get_num_threads()
    prev_pf = torch.ops.fastlm.int8_gemv_prefetch(-1)
    torch.set_num_threads(2)
    try:
        outs = []
        for threads, pf, separate in [(2, 0, False), (1, 0, False), (2, 1024, False), (2, 1024, True)]:
            torch.set_num_threads(threads)
            torch.ops.fastlm.int8_gemv_prefetch(pf)
            saved = [lin.qweight for lin in lins]
            if separate:
                for lin in lins:
                    lin.qweight = lin.qweight.clone()
            cache = prefilled(model, ids, 16)
            with torch.inference_mode():
                assert model._cpu_decode_params(torch.zeros(1, 1, 256), cache) is not None
                outs.append(model.decode_step(torch.tensor([7]), torch.tensor([5], dtype=torch.int32), cache, 6))
            for lin, q in zip(lins, saved, strict=True):
                lin.qweight = q
    finally:
        torch.set_num_threads(prev)
        torch.ops.fastlm.int8_gemv_prefetch(prev_pf)
    assert torch.isfinite(outs[0]).all()
    for y in outs[1:]:
        assert torch.equal(y, outs[0])
