"""torch.ops.fastlm.gpt2_decode_batch_cpu (csrc/decode_batch_cpu.cpp): a GPT-2 decode step for B
sequences of different lengths (ragged positions in the static cache) in one C++ call, reached
through GPT2LMHeadModel.decode_step. Against the op-by-op decode step, against one B = 1 step per
sequence, against transformers' greedy generate of each sequence alone (fp32, and int8 on the
dequantized weights), with NaN-poisoned cache rows past each sequence's length; bad input."""

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
    # head dim 25 (odd), untied head, GELU (erf), vocab 33
    "h4_d25_untied": dict(n_layer=1, n_head=4, n_embd=100, vocab_size=33, n_positions=64,
                          tie_word_embeddings=False, activation_function="gelu"),
}


def hf_model(name):
    cfg = tf.GPT2Config(**CONFIGS[name], initializer_range=0.4, bos_token_id=0, eos_token_id=0)
    hf = tf.GPT2LMHeadModel(cfg).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def prefilled(model, ids, lens, capacity):
    """A fresh cache (NaN-poisoned) holding the left-aligned prompts ids (B, T) of lengths lens (B,),
    and the logits (B, V) of each prompt's last token."""
    cfg = model.config
    B, T = ids.shape
    cache = StaticKVCache(cfg.n_layer, B, cfg.n_head, cfg.n_embd // cfg.n_head, capacity, torch.float32, "cpu")
    poison_(cache.k)
    poison_(cache.v)
    kpm = torch.arange(T)[None] < lens[:, None]
    with torch.inference_mode():
        logits = model.prefill(ids, None if bool(kpm.all()) else kpm, cache)
    return cache, logits[torch.arange(B), lens - 1]


def ragged(B, V, T_max, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T_max + 1, (B,), generator=g)
    lens[0] = T_max  # the longest sets T
    return torch.randint(1, V, (B, T_max), generator=g), lens


def ran_batch_op(fn):
    """Runs fn() under the profiler; whether it called fastlm::gpt2_decode_batch_cpu."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(e.key == "fastlm::gpt2_decode_batch_cpu" for e in prof.key_averages())


@pytest.fixture
def fp32_activations():
    """Comparisons of two float paths at fp32 rounding: the int8 GEMV keeps fp32 activations
    (int8_gemv_mode(0)). Its default int16 activations (per block of 64) differ from fp32 by up to
    2^-16 of a block's absmax, and inputs that differ by fp32 rounding can land on neighbouring int16
    values; tests/test_gemv_int8.py checks the int16 GEMV against its bound and
    test_ragged_greedy_equals_transformers_per_sequence the tokens on the default path."""
    prev = torch.ops.fastlm.int8_gemv_mode(-1)
    torch.ops.fastlm.int8_gemv_mode(0)
    yield
    torch.ops.fastlm.int8_gemv_mode(prev)


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("name,B", [("h3_d32", 3), ("h3_d32", 17), ("h4_d25_untied", 2), ("h4_d25_untied", 8)])
def test_batch_step_equals_op_by_op(name, B, quantize, monkeypatch, fp32_activations):
    model = fastlm.from_pretrained(hf_model(name), quantize=quantize)
    V, T = model.config.vocab_size, 9
    ids, lens = ragged(B, V, T, seed=B)
    fused_cache, first = prefilled(model, ids, lens, 24)
    ops_cache, _ = prefilled(model, ids, lens, 24)
    tok, pos = first.argmax(-1), lens.to(torch.int32)
    for step in range(4):
        kv_len = T + step + 1
        with torch.inference_mode():
            fused, used = ran_batch_op(lambda t=tok, p=pos, n=kv_len: model.decode_step(t, p, fused_cache, n))
            with monkeypatch.context() as m:
                m.setattr(type(model), "_cpu_decode_params", lambda *a: None)  # the op-by-op path
                ref = model.decode_step(tok, pos, ops_cache, kv_len)
        assert used, "the batched C++ step did not run"
        assert fused.shape == (B, V) and torch.isfinite(fused).all()
        # fp32 rounding apart (the op-by-op LayerNorm may be torch's): tolerances far below the logits' spread
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=5e-5)
        for b in range(B):  # each row wrote its own row pos[b] and nothing past it
            n = int(pos[b]) + 1
            for c, r in ((fused_cache.k, ops_cache.k), (fused_cache.v, ops_cache.v)):
                torch.testing.assert_close(c[:, b, :, :n], r[:, b, :, :n], rtol=1e-4, atol=5e-5)
                assert c[:, b, :, max(n, T):].isnan().all()
        tok, pos = fused.argmax(-1), pos + 1


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_batch_rows_equal_single_sequence_steps(quantize, fp32_activations):
    """Row b of a ragged batch step equals the B = 1 fused step (gpt2_decode_cpu) of sequence b alone."""
    model = fastlm.from_pretrained(hf_model("h3_d32"), quantize=quantize)
    B, V, T = 5, model.config.vocab_size, 11
    ids, lens = ragged(B, V, T, seed=7)
    cache, first = prefilled(model, ids, lens, 20)
    tok, pos = first.argmax(-1), lens.to(torch.int32)
    with torch.inference_mode():
        batch = model.decode_step(tok, pos, cache, T + 1)
        for b in range(B):
            one_cache, _ = prefilled(model, ids[b:b + 1, :lens[b]], lens[b:b + 1], 20)
            one = model.decode_step(tok[b:b + 1], pos[b:b + 1], one_cache, int(lens[b]) + 1)
            torch.testing.assert_close(batch[b:b + 1], one, rtol=1e-4, atol=5e-5)  # prefills differ (mask)


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("B", [1, 3])
def test_ragged_greedy_equals_transformers_per_sequence(B, quantize):
    hf = hf_model("h3_d32")
    model = fastlm.from_pretrained(hf, quantize=quantize)
    if quantize == "int8":  # transformers on the weights the int8 model computes with
        with torch.no_grad():
            for hb, b in zip(hf.transformer.h, model.h, strict=True):  # Conv1D keeps (in, out)
                for conv, lin in ((hb.attn.c_attn, b.attn.c_attn), (hb.attn.c_proj, b.attn.c_proj),
                                  (hb.mlp.c_fc, b.mlp.c_fc), (hb.mlp.c_proj, b.mlp.c_proj)):
                    conv.weight.copy_(lin.dequantized().t())
            hf.lm_head.weight.copy_(model.lm_head.dequantized())
    ids, lens = ragged(B, hf.config.vocab_size, 10, seed=11 + B)
    mask = (torch.arange(10)[None] < lens[:, None]).long()  # right padding, pad id 0
    ids = ids * mask
    new = 20
    out, used = ran_batch_op(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new))
    assert used == (B > 1)  # B == 1 takes gpt2_decode_cpu
    for b in range(B):
        n = int(lens[b])
        with torch.no_grad():
            expect = hf.generate(ids[b:b + 1, :n], max_new_tokens=new, do_sample=False)[0, n:]
        assert len(set(expect.tolist())) >= 5, "reference output is too repetitive to be a test"
        assert torch.equal(out[b, 10:], expect), b


def test_batch_of_one_without_kv_len():
    """B == 1 with kv_len None (a server's step) takes the batched op, equal to gpt2_decode_cpu."""
    model = fastlm.from_pretrained(hf_model("h3_d32"))
    ids, lens = ragged(1, 101, 6, seed=3)
    c1, first = prefilled(model, ids, lens, 16)
    c2, _ = prefilled(model, ids, lens, 16)
    tok, pos = first.argmax(-1), lens.to(torch.int32)
    with torch.inference_mode():
        a, used = ran_batch_op(lambda: model.decode_step(tok, pos, c1))
        b = model.decode_step(tok, pos, c2, 7)
    assert used
    torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)


def _args(model, cache, pos, kv_len=8):
    B = pos.shape[0]
    h = torch.randn(B, 1, model.config.n_embd)
    params = model._cpu_decode_params(h, cache)
    return [h, list(params), cache.k, cache.v, pos, kv_len, list(model._attn_scales), model.config.vocab_size,
            model.ln_f.eps, model.h[0].mlp.activation]


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a.__setitem__(4, torch.tensor([2, 8, 1], dtype=torch.int32)), ValueError,
         r"pos\[1\] = 8 is outside \[0, kv_len = 8\)"),
        (lambda a: a.__setitem__(4, torch.tensor([2, -1, 1])), ValueError, r"pos\[1\] = -1 is outside"),
        (lambda a: a.__setitem__(4, torch.tensor([2, 3])), ValueError, r"pos must be a CPU tensor \(B,\) = \(3,\)"),
        (lambda a: a.__setitem__(4, torch.tensor([2.0, 3.0, 1.0])), TypeError, "pos must be int32 or int64"),
        (lambda a: a.__setitem__(5, 17), ValueError, r"kv_len must be in \[1, 16\]"),
        (lambda a: a.__setitem__(0, torch.randn(4, 1, a[0].shape[-1])), ValueError, "batch >= B = 4"),
        (lambda a: a.__setitem__(0, torch.randn(3, 2, a[0].shape[-1])), ValueError,
         r"h must be a CPU tensor \(B, 1, C\)"),
        (lambda a: a.__setitem__(0, a[0].double()), TypeError, "h must be float32"),
        (lambda a: a.__setitem__(1, a[1][:-1]), ValueError, "params must hold"),
        (lambda a: a[1].__setitem__(2, a[1][2][:, :-1].contiguous()), ValueError, "c_attn weight must be"),
        (lambda a: a[1].__setitem__(16 + 1, None), ValueError, "ln_1 bias is missing"),
        (lambda a: a.__setitem__(9, "relu"), ValueError, "activation must be"),
        (lambda a: a.__setitem__(8, float("nan")), ValueError, "eps must be"),
        (lambda a: a.__setitem__(6, [float("inf")] * len(a[6])), ValueError, "scales must be finite"),
    ],
)
def test_bad_input_raises_and_leaves_the_cache(change, exc, match):
    model = fastlm.from_pretrained(hf_model("h3_d32"))
    ids, lens = ragged(3, 101, 4, seed=5)
    cache, _ = prefilled(model, ids, lens, 16)
    before_k, before_v = cache.k.clone(), cache.v.clone()
    args = _args(model, cache, lens.to(torch.int32))
    change(args)
    with pytest.raises(exc, match=match):
        torch.ops.fastlm.gpt2_decode_batch_cpu(*args)
    assert torch.equal(cache.k.nan_to_num(7.0), before_k.nan_to_num(7.0))
    assert torch.equal(cache.v.nan_to_num(7.0), before_v.nan_to_num(7.0))


def test_decode_step_names_a_bad_position():
    model = fastlm.from_pretrained(hf_model("h3_d32"))
    ids, lens = ragged(2, 101, 4, seed=6)
    cache, first = prefilled(model, ids, lens, 16)
    with torch.inference_mode(), pytest.raises(ValueError, match=r"pos\[0\] = 16 is outside"):
        model.decode_step(first.argmax(-1), torch.tensor([16, 2], dtype=torch.int32), cache)


def test_fake():
    model = fastlm.from_pretrained(hf_model("h4_d25_untied"))
    ids, lens = ragged(3, 33, 4, seed=8)
    cache, _ = prefilled(model, ids, lens, 16)
    torch.library.opcheck(torch.ops.fastlm.gpt2_decode_batch_cpu, tuple(_args(model, cache, lens.to(torch.int32))),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("B", [17, 21, 33, 40])
def test_int8_batch_row_equals_the_row_alone_past_16_rows(B):
    """A decode step of B > 16 rows (past the GEMV's one-pass row count; int8 pair panels run the
    int16-activation kernels up to 64 rows): row b equals the B = 1 step on a copy of row b's
    cache (bit-identical inputs, so any difference is the GEMM's row blocking), on the default
    path (int16 activations). A bf16 batch is not covered: it runs op by op in bf16 (decode_step),
    whose bf16 rounding of the activations differs from the fused B = 1 bf16 step."""
    model = fastlm.from_pretrained(hf_model("h3_d32"), quantize="int8")
    cfg, V, T = model.config, model.config.vocab_size, 7
    g = torch.Generator().manual_seed(B)
    cache = StaticKVCache(cfg.n_layer, B, cfg.n_head, cfg.n_embd // cfg.n_head, 16, model.dtype, "cpu")
    lens = torch.randint(1, T + 1, (B,), generator=g)
    for c in (cache.k, cache.v):  # random keys / values (fresh per B)
        c.copy_(torch.randn(c.shape, generator=g))
    tok, pos = torch.randint(0, V, (B,), generator=g), lens.to(torch.int32)
    with torch.inference_mode():
        ones = []
        for b in range(B):  # before the batch step writes row pos[b]
            one_cache = StaticKVCache(cfg.n_layer, 1, cfg.n_head, cfg.n_embd // cfg.n_head, 16, model.dtype, "cpu")
            one_cache.k.copy_(cache.k[:, b:b + 1])
            one_cache.v.copy_(cache.v[:, b:b + 1])
            ones.append(model.decode_step(tok[b:b + 1], pos[b:b + 1], one_cache, int(lens[b]) + 1))
        batch, used = ran_batch_op(lambda: model.decode_step(tok, pos, cache, T + 1))
    assert used, "the batched C++ step did not run"
    assert batch.shape == (B, V) and torch.isfinite(batch).all()
    for b in range(B):
        torch.testing.assert_close(batch[b:b + 1].float(), ones[b].float(), rtol=1e-4, atol=5e-5)
