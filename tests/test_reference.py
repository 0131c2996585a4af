"""The reference ops against independent formulations in float64."""

import pytest
import torch
import torch.nn.functional as F

from fastlm import reference as ref


@pytest.mark.parametrize("s_q,s_k", [(1, 1), (17, 17), (5, 17), (17, 5), (97, 129)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_sdpa_fp64(s_q, s_k, causal):
    q, k, v = (torch.randn(2, 3, s, 32, dtype=torch.float64) for s in (s_q, s_k, s_k))
    kpm = torch.rand(2, s_k) > 0.3
    kpm[:, -1] = True  # every row keeps a key, so SDPA has no NaN rows
    keep = kpm[:, None, None, :]
    if causal:
        keep = keep & ref.causal_keep(s_q, s_k, q.device)
    rows_ok = keep.any(-1, keepdim=True)  # (B, 1, S_q, 1)
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | ~rows_ok)  # NaN-free
    expect = torch.where(rows_ok, expect, torch.zeros_like(expect))
    out = ref.attention(q, k, v, causal, kpm, None)
    assert torch.allclose(out, expect, atol=1e-10)


def test_causal_aligns_queries_to_the_end():
    keep = ref.causal_keep(2, 4, torch.device("cpu"))
    assert keep.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_fully_masked_rows_give_zero():
    q, k, v = (torch.randn(2, 2, 7, 16) for _ in range(3))
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1] = False
    out = ref.attention(q, k, v, False, kpm, None)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0


def test_varlen_equals_per_sequence():
    lens = [3, 1, 9]
    cu = torch.tensor([0, 3, 4, 13], dtype=torch.int32)
    q, k, v = (torch.randn(13, 2, 16) for _ in range(3))
    out = ref.attention_varlen(q, k, v, cu, 9, True, None)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        one = ref.attention(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None], True)
        assert torch.allclose(out[sl], one[0].transpose(0, 1), atol=1e-6)
        start += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softmax_bool_and_float_masks(dtype):
    x = torch.randn(4, 5, 33).to(dtype)
    m = torch.rand(4, 1, 33) > 0.5
    m[0] = False
    out = ref.softmax(x, -1, 0.5, m)
    expect = torch.softmax((x.double() * 0.5).masked_fill(~m, float("-inf")), -1)
    expect[0] = 0
    assert torch.allclose(out.double(), expect, atol=1e-2 if dtype != torch.float32 else 1e-6)
    add = torch.randn(33)
    assert torch.allclose(ref.softmax(x.float(), -1, 1.0, add), torch.softmax(x.float() + add, -1), atol=1e-6)


def test_layer_norm_residual_and_gelu_and_ffn():
    x, r = torch.randn(3, 7, 40), torch.randn(3, 7, 40)
    w, b = torch.randn(40), torch.randn(40)
    y, s = ref.layer_norm(x, w, b, 1e-5, r)
    assert torch.allclose(s, x + r)
    assert torch.allclose(y, F.layer_norm(x + r, (40,), w, b, 1e-5), atol=1e-5)
    w1, b1, w2, b2 = torch.randn(64, 40), torch.randn(64), torch.randn(40, 64), torch.randn(40)
    h = x.double() @ w1.double().T + b1.double()
    act = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
    expect = act @ w2.double().T + b2.double() + r.double()
    got = ref.ffn(x, w1, b1, w2, b2, "gelu_tanh", r)
    assert torch.allclose(got.double(), expect, rtol=1e-4, atol=1e-3)


def test_decode_attention_is_masked_attention():
    q = torch.randn(3, 2, 1, 16)
    kc, vc = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    lens = torch.tensor([1, 20, 7], dtype=torch.int32)
    out = ref.decode_attention(q, kc, vc, lens)
    for b, n in enumerate(lens.tolist()):
        one = ref.attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n])
        assert torch.allclose(out[b:b + 1], one, atol=1e-6)
