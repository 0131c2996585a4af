"""torch.ops.fastlm.argmax_rows (csrc/argmax_cpu.cpp: greedy decoding's row argmax on the calling thread,
no OpenMP region) against torch.argmax, and the CPU pool rows scope of the LayerNorm ops
(torch.ops.fastlm.cpu_pool_scope, fastlm._ext.pool_scope): the same bits in and out of the scope, and a
GPT-2 prefill / greedy generate that uses both still equal to transformers."""

import pytest
import torch

from fastlm import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="fastlm._C not built")


@pytest.mark.parametrize("rows,n", [(1, 1), (1, 17), (3, 97), (17, 129), (32, 50257), (33, 1000)])
def test_argmax_rows_equals_torch(rows, n):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, n, generator=g)
    # ties: copy each row's maximum to a later and an earlier position; the first one must win
    if n >= 3:
        j = torch.randint(0, n, (rows,), generator=g)
        x[torch.arange(rows), j] = x.max(-1).values
        x[:, n // 2] = x.max(-1).values
    got = torch.ops.fastlm.argmax_rows(x)
    assert got.dtype == torch.long and got.shape == (rows,)
    assert torch.equal(got, x.argmax(-1))


def test_argmax_rows_nan_inf_and_views():
    x = torch.randn(6, 200)
    x[0, 7] = float("nan")
    x[0, 150] = float("nan")  # the first NaN wins, as torch.argmax
    x[1] = float("-inf")  # all -inf: index 0
    x[2, 199] = float("inf")
    x[3, :] = 0.0  # all equal: index 0
    x[4, 0] = float("nan")
    x[5, 199] = float("nan")  # a NaN in the scalar tail
    assert torch.equal(torch.ops.fastlm.argmax_rows(x), x.argmax(-1))
    y = torch.randn(200, 6).t()  # not contiguous
    assert torch.equal(torch.ops.fastlm.argmax_rows(y), y.argmax(-1))
    z = torch.randn(5, 300)[1:, 40:237]  # rows with unit stride, a row stride of 300 (read in place)
    z[2, 0] = float("nan")
    assert z.stride() == (300, 1)
    assert torch.equal(torch.ops.fastlm.argmax_rows(z), z.argmax(-1))


@pytest.mark.parametrize("bad,exc,match", [
    (torch.zeros(2, 3, dtype=torch.float64), TypeError, "x must be float32"),
    (torch.zeros(2, 3, 4), ValueError, r"x must be a CPU tensor \(rows, n\)"),
    (torch.zeros(2, 0), ValueError, "n >= 1"),
])
def test_argmax_rows_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.fastlm.argmax_rows(bad)


def test_choose_greedy_uses_the_same_argmax():
    from fastlm.generation import choose

    s = torch.randn(5, 333)
    s[2, 10] = float("nan")
    assert torch.equal(choose(s, False, None), s.argmax(-1))


@pytest.mark.parametrize("rows", [1, 17, 97, 512])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_in_pool_scope_is_bit_identical(rows, residual):
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(rows)
    x, r = torch.randn(rows, 768, generator=g), torch.randn(rows, 768, generator=g)
    w, b = torch.randn(768, generator=g), torch.randn(768, generator=g)

    def run():
        if residual:
            return torch.ops.fastlm.add_layer_norm_ext(x, r, w, b, 1e-5)
        return (torch.ops.fastlm.layer_norm_ext(x, w, b, 1e-5),)

    out = run()
    with _ext.pool_scope():
        assert torch.ops.fastlm.cpu_pool_scope(1) == 1  # inside: on (set again, returns the previous)
        inside = run()
    assert torch.ops.fastlm.cpu_pool_scope(0) == 0  # restored on exit
    for a, c in zip(out, inside, strict=True):
        assert torch.equal(a, c)
    ref = torch.nn.functional.layer_norm(x + r if residual else x, (768,), w, b, 1e-5)
    torch.testing.assert_close(inside[0], ref, atol=1e-5, rtol=1e-5)


def test_pool_scope_bad_value():
    with pytest.raises(ValueError, match="on must be 0 or 1"):
        torch.ops.fastlm.cpu_pool_scope(2)


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("B", [1, 2, 17])
def test_prefill_in_pool_scope_and_greedy_equal_transformers(B, quantize):
    """The GPT-2 prefill runs its LayerNorms in the pool scope and greedy picks through argmax_rows:
    transformers' greedy tokens per batch (random weights scaled so that the tokens vary; int8:
    transformers on the dequantized weights)."""
    import transformers as tf

    import fastlm

    torch.manual_seed(B)
    cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=64, initializer_range=0.4,
                        bos_token_id=0, eos_token_id=0)
    hf = tf.GPT2LMHeadModel(cfg).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    m = fastlm.from_pretrained(hf, quantize=quantize)
    assert m._pool_gemms(torch.zeros(1, 1, 64))  # packed / int8 panels on CPU: the scope is taken
    if quantize == "int8":
        with torch.no_grad():
            for hb, b in zip(hf.transformer.h, m.h, strict=True):  # Conv1D keeps (in, out)
                for conv, lin in ((hb.attn.c_attn, b.attn.c_attn), (hb.attn.c_proj, b.attn.c_proj),
                                  (hb.mlp.c_fc, b.mlp.c_fc), (hb.mlp.c_proj, b.mlp.c_proj)):
                    conv.weight.copy_(lin.dequantized().t())
            hf.lm_head.weight.copy_(m.lm_head.dequantized())
    ids = torch.randint(1, 500, (B, 7))
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    got = m.generate(ids, max_new_tokens=12)
    for b in range(B):
        assert len(set(ref[b, 7:].tolist())) >= 5, "reference output is too repetitive to be a test"
    assert torch.equal(got, ref)
    assert torch.ops.fastlm.cpu_pool_scope(0) == 0  # generate left the scope off
