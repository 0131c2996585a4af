"""GPT-2 in bfloat16 on the CPU: the one-call decode step torch.ops.fastlm.gpt2_decode_cpu_bf16
(csrc/decode_bf16.cpp: bf16 pair-panel weights, bf16 KV cache, fp32 LayerNorm / softmax /
accumulation) against the fp32 reference, by the accuracy contract of docs/design.md: the error of
fastlm's bf16 logits against transformers' fp32 is within 2x of transformers' own bf16 error on the
same inputs; greedy tokens agree with fp32 at least as often as transformers' bf16 does. Also: the
fused step is what model.generate runs, it writes bf16 keys / values into the cache, and bad input
raises clear errors without touching the cache."""

import pytest
import torch
import transformers as tf

import fastlm
from fastlm import _ext
from fastlm.cache import StaticKVCache
from fastlm.testing import poison_

pytestmark = pytest.mark.skipif(
    not _ext.available() or not hasattr(torch.ops.fastlm, "gpt2_decode_cpu_bf16"),
    reason=f"fastlm._C not built with the bf16 kernels: {_ext.LOAD_ERROR}")

CONFIGS = {
    # head dim 32, d_ff 200 (not a multiple of 16), scaled by inverse layer index
    "h3_d32": dict(n_layer=2, n_head=3, n_embd=96, n_inner=200, vocab_size=301, n_positions=96,
                   scale_attn_by_inverse_layer_idx=True),
    # head dim 25 (odd), odd d_ff, untied head, GELU (erf)
    "h4_d25": dict(n_layer=2, n_head=4, n_embd=100, n_inner=77, vocab_size=257, n_positions=96,
                   tie_word_embeddings=False, activation_function="gelu"),
    # head dim 64 (GPT-2's), 8 heads: from kv_len 32 on the heads are split across the threads
    "h8_d64": dict(n_layer=1, n_head=8, n_embd=512, n_inner=96, vocab_size=131, n_positions=96),
}


def hf_model(name, seed=0):
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(**CONFIGS[name], initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    hf = tf.GPT2LMHeadModel(cfg).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def teacher_forced_logits(model, ids, prompt):
    """fastlm logits (T - prompt + 1, vocab) float64: the prefill's last row, then one decode step
    per further token of ids (1, T), through the bf16 cache."""
    cfg = model.config
    cache = StaticKVCache(cfg.n_layer, 1, cfg.n_head, cfg.n_embd // cfg.n_head, ids.shape[1] + 4, model.dtype, "cpu")
    poison_(cache.k)
    poison_(cache.v)
    out = []
    with torch.inference_mode():
        out.append(model.prefill(ids[:, :prompt], None, cache)[0, -1].double())
        for t in range(prompt, ids.shape[1]):
            tok, pos = ids[:, t], torch.tensor([t], dtype=torch.int32)
            out.append(model.decode_step(tok, pos, cache, kv_len=t + 1)[0].double())
    return torch.stack(out)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_within_2x_of_transformers_bf16_error(name, fused, monkeypatch):
    hf = hf_model(name)
    cfg = hf.config
    model = fastlm.from_pretrained(hf, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    h = torch.zeros(1, 1, cfg.n_embd, dtype=torch.bfloat16)
    probe = StaticKVCache(cfg.n_layer, 1, cfg.n_head, cfg.n_embd // cfg.n_head, 8, torch.bfloat16, "cpu")
    assert model._cpu_decode_params(h, probe) is not None  # the one-call bf16 step applies
    if not fused:
        monkeypatch.setattr(type(model), "_cpu_decode_params", lambda self, h, cache: None)
    ids = torch.randint(1, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    prompt = 7
    with torch.inference_mode():
        ref = hf(ids).logits[0, prompt - 1:].double()  # fp32 reference
        hf_bf16 = hf_model(name).to(torch.bfloat16)
        ref_bf16 = hf_bf16(ids).logits[0, prompt - 1:].double()
    got = teacher_forced_logits(model, ids, prompt)
    assert torch.isfinite(got).all()
    err, hf_err = (got - ref).abs().max().item(), (ref_bf16 - ref).abs().max().item()
    assert hf_err > 0
    assert err <= 2 * hf_err, f"fastlm bf16 max err {err:.3g} > 2x transformers bf16 {hf_err:.3g}"


def test_greedy_agreement_with_fp32_at_least_transformers_bf16():
    """Fixed prompt set: 6 prompts of 3-17 tokens, 24 new tokens each; fraction of generated tokens
    equal to fp32 greedy's, position by position."""
    hf = hf_model("h3_d32", seed=3)
    fp32 = fastlm.from_pretrained(hf)
    bf = fastlm.from_pretrained(hf, dtype="bf16")
    hf_bf16 = hf_model("h3_d32", seed=3).to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    ours = theirs = total = 0
    for n in (3, 5, 8, 11, 13, 17):
        ids = torch.randint(1, 301, (1, n), generator=g)
        want = fp32.generate(ids, max_new_tokens=24, do_sample=False)[0, n:]
        with torch.inference_mode():
            hf_out = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, n:]
        assert torch.equal(want, hf_out)  # fp32 stays exact against transformers
        got = bf.generate(ids, max_new_tokens=24, do_sample=False)[0, n:]
        with torch.inference_mode():
            hb = hf_bf16.generate(ids, max_new_tokens=24, do_sample=False)[0, n:]
        ours += int((got == want).sum())
        theirs += int((hb == want).sum())
        total += want.numel()
    assert ours >= theirs, f"fastlm bf16 agrees on {ours}/{total} tokens, transformers bf16 on {theirs}/{total}"
    assert ours >= 0.9 * total


def test_cache_holds_bf16_keys_of_this_step():
    hf = hf_model("h3_d32")
    model = fastlm.from_pretrained(hf, dtype=torch.bfloat16)
    cfg = model.config
    ids = torch.randint(1, 301, (1, 5))
    cache = StaticKVCache(cfg.n_layer, 1, cfg.n_head, cfg.n_embd // cfg.n_head, 8, torch.bfloat16, "cpu")
    poison_(cache.k)
    poison_(cache.v)
    with torch.inference_mode():
        model.prefill(ids[:, :4], None, cache)
        logits = model.decode_step(ids[:, 4], torch.tensor([4], dtype=torch.int32), cache, kv_len=5)
    assert logits.dtype == torch.float32 and logits.shape == (1, cfg.vocab_size) and torch.isfinite(logits).all()
    assert torch.isfinite(cache.k[:, 0, :, :5].float()).all() and torch.isfinite(cache.v[:, 0, :, :5].float()).all()
    assert torch.isnan(cache.k[:, 0, :, 5:].float()).all()  # rows past the step untouched
    # row 4 of layer 0 = bf16(k) of ln_1(h) @ Wk^T + bk, h = wte + wpe in fp32
    with torch.inference_mode():
        blk = model.h[0]
        h = (model.wte.weight[ids[0, 4]].float() + model.wpe.weight[4].float())[None]
        x = torch.nn.functional.layer_norm(h, (cfg.n_embd,), blk.ln_1.weight.float(), blk.ln_1.bias.float(),
                                           blk.ln_1.eps)
        w = blk.attn.c_attn.dense_weight().float()
        k = (x @ w.t() + blk.attn.c_attn.bias.float())[0, cfg.n_embd:2 * cfg.n_embd].view(cfg.n_head, -1)
    torch.testing.assert_close(cache.k[0, 0, :, 4].float(), k.bfloat16().float(), atol=1e-2, rtol=1e-2)


def _args(model, cache, kv_len=4):
    h = torch.randn(1, 1, model.config.n_embd).bfloat16()
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
        (lambda a: a[1].__setitem__(2, a[1][2].float()), TypeError, "c_attn weight must be bfloat16"),
        (lambda a: a[1].__setitem__(3, torch.ones(1)), ValueError, "bf16 weights take none"),
        (lambda a: a[1].__setitem__(16 + 1, None), ValueError, "ln_1 bias is missing"),
        (lambda a: a.__setitem__(0, a[0].double()), TypeError, "h must be float32 or bfloat16"),
        (lambda a: a.__setitem__(2, a[2].float()), TypeError, "KV cache must be bfloat16"),
        (lambda a: a.__setitem__(8, "relu"), ValueError, "activation must be"),
        (lambda a: a.__setitem__(7, float("nan")), ValueError, "eps must be"),
        (lambda a: a.__setitem__(5, [float("inf")] * len(a[5])), ValueError, "scales must be finite"),
    ],
)
def test_bad_input_raises_and_leaves_the_cache(change, exc, match):
    model = fastlm.from_pretrained(hf_model("h3_d32"), dtype=torch.bfloat16)
    cfg = model.config
    cache = StaticKVCache(cfg.n_layer, 1, cfg.n_head, cfg.n_embd // cfg.n_head, 16, torch.bfloat16, "cpu")
    with torch.inference_mode():
        model.prefill(torch.randint(1, 301, (1, 3)), None, cache)
    before_k, before_v = cache.k.clone(), cache.v.clone()
    args = _args(model, cache)
    change(args)
    with pytest.raises(exc, match=match):
        torch.ops.fastlm.gpt2_decode_cpu_bf16(*args)
    assert torch.equal(cache.k, before_k) and torch.equal(cache.v, before_v)


def test_bf16_panels_share_one_arena_in_step_order():
    """One weight layout per model: every bf16 projection is a view of one allocation, laid out in
    the order the decode step reads them (the LM head last), and the step still matches the
    op-by-op path on those weights."""
    hf = hf_model("h3_d32")
    model = fastlm.from_pretrained(hf, dtype=torch.bfloat16)
    lins = model.decode_linears()
    assert all(lin.packed.dtype == torch.bfloat16 and lin.packed.is_contiguous() for lin in lins)
    base = lins[0].packed.untyped_storage().data_ptr()
    assert all(lin.packed.untyped_storage().data_ptr() == base for lin in lins)
    offs = [lin.packed.data_ptr() - base for lin in lins]
    sizes = [lin.packed.numel() * 2 for lin in lins]
    assert offs == [sum(sizes[:i]) for i in range(len(lins))]
    ref = hf_model("h3_d32").to(torch.bfloat16)
    assert torch.equal(lins[0].dense_weight(), ref.transformer.h[0].attn.c_attn.weight.t())
    assert torch.equal(lins[-1].dense_weight(), ref.lm_head.weight)
    model.decode_layout_()  # idempotent: no second arena
    assert lins[0].packed.untyped_storage().data_ptr() == base


def test_fp32_model_is_not_routed_to_bf16():
    model = fastlm.from_pretrained(hf_model("h3_d32"))
    cfg = model.config
    bf_cache = StaticKVCache(cfg.n_layer, 1, cfg.n_head, cfg.n_embd // cfg.n_head, 8, torch.bfloat16, "cpu")
    assert model._cpu_decode_params(torch.zeros(1, 1, cfg.n_embd, dtype=torch.bfloat16), bf_cache) is None
    model.to(torch.bfloat16)  # fp32 panels re-laid out as bf16 pair panels
    assert model._cpu_decode_params(torch.zeros(1, 1, cfg.n_embd, dtype=torch.bfloat16), bf_cache) is not None


@pytest.mark.parametrize("head", ["BertModel", "BertForSequenceClassification"])
def test_bert_bf16_within_2x_of_transformers_bf16_error(head):
    """Encoders in bf16 (oneDNN bf16 GEMMs with fused epilogues: 4 x 40 = 160 rows, past the oneDNN
    threshold): output error against transformers fp32 <= 2x transformers' own bf16 error."""
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=211, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=300, max_position_embeddings=64, num_labels=3)
    hf = getattr(tf, head)(cfg).eval()
    ids = torch.randint(0, 211, (4, 40))
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0
    hb = getattr(tf, head)(cfg).eval()
    hb.load_state_dict(hf.state_dict())
    hb = hb.to(torch.bfloat16)
    model = fastlm.from_pretrained(hf, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = (lambda o: o[0])
        ref = out(hf(ids, attention_mask=mask)).double()
        ref_bf16 = out(hb(ids, attention_mask=mask)).double()
        got = out(model(ids, attention_mask=mask)).double()
    keep = mask.bool() if ref.dim() == 3 else torch.ones(ref.shape[0], dtype=torch.bool)  # padded rows undefined
    err, hf_err = (got - ref)[keep].abs().max().item(), (ref_bf16 - ref)[keep].abs().max().item()
    assert torch.isfinite(got).all() and hf_err > 0
    assert err <= 2 * hf_err, f"fastlm bf16 max err {err:.3g} > 2x transformers bf16 {hf_err:.3g}"
