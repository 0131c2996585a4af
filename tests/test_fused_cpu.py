"""Issue 10.4: on CPU tensors each op runs the faster of fastlm._C's C++ twin and torch's fused
ops (fastlm.fused), keeping the op's contract; checked against the fp64/fp32 reference with the
2x rule, on awkward shapes, strided views, fully masked rows and poisoned outputs."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import _ext, backend, fused, ops
from fastlm import reference as ref
from fastlm.testing import close_2x, max_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def up(dtype):
    return torch.float64 if dtype == torch.float32 else torch.float32


def test_auto_on_cpu_picks_the_measured_fastest():
    cpu = torch.device("cpu")
    for op in ("attention", "attention_varlen", "softmax", "decode_attention"):
        assert ops._pick(op, cpu) == "fused", op
    for op in ("bias_gelu", "ffn", "layer_norm"):
        assert ops._pick(op, cpu) == ("cuda" if _ext.available() else "fused"), op
        assert backend.cpu_choice(op, has_c=False) == "fused"  # without fastlm._C: torch's fused op
    with fastlm.use_backend("torch"):
        assert all(ops._pick(op, cpu) == "torch" for op in ops.KERNELS)  # the reference, for A/B


@pytest.mark.parametrize("S", [1, 17, 97, 129])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_fused_strided_padded(S, dtype, causal):
    B, H, D = 2, 3, 64 if S % 2 else 40
    qkv = torch.randn(B, S, 3, H, D).to(dtype)  # a fused QKV projection, read through strided views
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    kpm = torch.ones(B, S, dtype=torch.bool)
    kpm[1, S // 2:] = False
    kpm[1, 0] = True
    out = ops.attention(q, k, v, causal=causal, key_padding_mask=kpm)
    expect = ref.attention(*(t.to(up(dtype)) for t in (q, k, v)), causal, kpm)
    keep = ref.causal_keep(S, S, q.device) if causal else torch.ones(S, S, dtype=torch.bool)
    keep = keep & kpm[:, None, None, :]
    plain = torch.softmax((q @ k.transpose(-1, -2) * D**-0.5).masked_fill(~keep, float("-inf")), -1) @ v
    close_2x(out, expect, plain.nan_to_num(0.0), what=f"S{S} {dtype} causal={causal}")


@pytest.mark.parametrize("sq,sk", [(1, 17), (5, 97), (17, 5), (3, 1)])
def test_attention_fused_causal_end_aligned_and_rows_without_keys(sq, sk):
    q = torch.randn(2, 2, sq, 32)
    k, v = torch.randn(2, 2, sk, 32), torch.randn(2, 2, sk, 32)
    kpm = torch.ones(2, sk, dtype=torch.bool)
    kpm[1] = False  # batch 1 sees no key at all
    out = ops.attention(q, k, v, causal=True, key_padding_mask=kpm)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    assert max_err(out, ref.attention(q.double(), k.double(), v.double(), True, kpm)) < 1e-5
    out = ops.attention(q, k, v, causal=True)
    assert max_err(out, ref.attention(q.double(), k.double(), v.double(), True)) < 1e-5
    if sq > sk:  # queries before the first key see nothing: 0, not NaN
        assert out[:, :, : sq - sk].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_varlen_fused(dtype):
    lens = [17, 1, 0, 97]
    cu = torch.tensor([0, 17, 18, 18, 115], dtype=torch.int32)
    qkv = torch.randn(115, 3, 4, 64).to(dtype)
    q, k, v = qkv.unbind(1)  # strided (T, H, D) views
    out = torch.full_like(q, float("nan"))
    out.copy_(ops.attention_varlen(q, k, v, cu, max(lens), causal=True))
    expect = ref.attention_varlen(*(t.to(up(dtype)) for t in (q, k, v)), cu, max(lens), True)
    plain = ref.attention_varlen(q, k, v, cu, max(lens), True)
    close_2x(out, expect, plain, what=f"varlen {dtype}")


@pytest.mark.parametrize("n", [1, 17, 129, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_softmax_fused(n, dtype, mask_kind):
    x = (torch.randn(3, 5, n) * 4).to(dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(3, 1, n) > 0.3
        mask[1] = False  # fully masked rows
    elif mask_kind == "float":
        mask = torch.randn(1, 5, n).to(dtype)
        mask[0, 2] = float("-inf")
    out = ops.softmax(x, scale=0.7, mask=mask)
    expect = ref.softmax(x.to(up(dtype)), -1, 0.7, None if mask is None else mask if mask.dtype == torch.bool
                         else mask.to(up(dtype)))
    s = x.float() * 0.7
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    plain = torch.softmax(s, -1).nan_to_num(0.0).to(dtype)
    close_2x(out, expect, plain, what=f"n{n} {dtype} {mask_kind}")
    if mask_kind == "bool":
        assert out[1].abs().max() == 0
    if mask_kind == "float":
        assert out[:, 2].abs().max() == 0


def test_softmax_fused_other_dims_and_minus_inf_rows():
    x = torch.randn(4, 7, 6)
    x[2, :, 3] = float("-inf")  # a row (along dim 1) with no finite entry
    out = ops.softmax(x, dim=1, scale=2.0)
    assert max_err(out, ref.softmax(x.double(), 1, 2.0)) < 1e-6
    assert out[2, :, 3].abs().max() == 0 and torch.isfinite(out).all()


def test_decode_attention_fused_mixed_lengths_strided_cache():
    # a cache stored (B, S_max, H, D) and viewed (B, H, S_max, D); lengths differ; NaN past them
    lens = torch.tensor([5, 0, 40, 40, 1], dtype=torch.int32)
    kc = torch.randn(5, 40, 4, 32).transpose(1, 2)
    vc = torch.randn(5, 40, 4, 32).transpose(1, 2)
    past = torch.arange(40)[None] >= lens[:, None].long()
    kp = kc.masked_fill(past[:, None, :, None], float("nan"))
    vp = vc.masked_fill(past[:, None, :, None], float("inf"))
    q = torch.randn(5, 4, 1, 32)
    out = ops.decode_attention(q, kp, vp, lens)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    assert max_err(out, ref.decode_attention(q.double(), kc.double(), vc.double(), lens)) < 1e-5
    same = torch.full((5,), 40, dtype=torch.int32)  # the one-call path: every sequence full
    assert max_err(ops.decode_attention(q, kc, vc, same), ref.decode_attention(q.double(), kc.double(),
                                                                                 vc.double(), same)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_bias_gelu_ffn_fused(dtype):
    """torch's fused versions (what runs on CPU without fastlm._C) keep the reference's math."""
    x, r = torch.randn(17, 96).to(dtype), torch.randn(17, 96).to(dtype)
    w, b = (1 + 0.1 * torch.randn(96)).to(dtype), (0.1 * torch.randn(96)).to(dtype)
    u = up(dtype)
    close_2x(fused.layer_norm(x, w, b, 1e-5), ref.layer_norm(x.to(u), w.to(u), b.to(u), 1e-5),
             F.layer_norm(x, (96,), w, b, 1e-5), what="layer_norm")
    y, s = fused.layer_norm(x, w, b, 1e-5, r)
    ey, es = ref.layer_norm(x.to(u), w.to(u), b.to(u), 1e-5, r.to(u))
    close_2x(y, ey, F.layer_norm(x + r, (96,), w, b, 1e-5), what="add_layer_norm")
    close_2x(s, es, x + r, what="add_layer_norm sum")
    bias = torch.randn(96).to(dtype)
    for ap in ("none", "tanh"):
        close_2x(fused.bias_gelu(x, bias, ap), ref.bias_gelu(x.to(u), bias.to(u), ap),
                 F.gelu(x + bias, approximate=ap), what=f"bias_gelu {ap}")
    w1, b1 = (torch.randn(200, 96) * 0.1).to(dtype), torch.randn(200).to(dtype)
    w2, b2 = (torch.randn(96, 200) * 0.07).to(dtype), torch.randn(96).to(dtype)
    for act, ap in (("gelu", "none"), ("gelu_tanh", "tanh")):
        for res in (None, r):
            out = fused.ffn(x, w1, b1, w2, b2, act, res)
            expect = ref.ffn(*(t.to(u) for t in (x, w1, b1, w2, b2)), act, None if res is None else res.to(u))
            plain = F.linear(F.gelu(F.linear(x, w1, b1), approximate=ap), w2, b2)
            close_2x(out, expect, plain if res is None else plain + res, what=f"ffn {act} {dtype}")
