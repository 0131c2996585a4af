"""Triton attention (padded and varlen) against the fp32/fp64 reference. On CPU it runs in the
Triton interpreter; on a GPU, for real. Outputs are poisoned before the kernel writes them."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm import reference as ref
from fastlm.kernels import attention as kernel
from fastlm.kernels.utils import Launch
from fastlm.testing import close_2x, max_err, poison_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BH = [(1, 1), (3, 3), (1, 12), (3, 12)]


def plain_torch(q, k, v, causal, kpm, scale):
    """torch's own attention in the low dtype: the error the 2x rule compares against."""
    keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    if causal:
        keep = ref.causal_keep(q.shape[2], k.shape[2], q.device)
    keep = keep[None, None] & (kpm[:, None, None, :] if kpm is not None else True)
    if q.device.type == "cpu" and q.dtype != torch.float32:  # CPU SDPA in half precision: eager instead
        s = (q @ k.transpose(-1, -2)) * scale
        return torch.softmax(s.masked_fill(~keep, float("-inf")), -1).to(q.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


def run_kernel(q, k, v, causal, kpm, scale, launch=None):
    out = poison_(kernel.empty_out(q, v))
    res = kernel.attention(q, k, v, causal, kpm, scale, launch=launch, out=out)
    assert res.data_ptr() == out.data_ptr()
    return res


def check(q, k, v, causal, kpm, launch=None, what=""):
    scale = q.shape[-1] ** -0.5
    out = run_kernel(q, k, v, causal, kpm, scale, launch)
    if q.dtype == torch.float32:
        expect = ref.attention(q.double(), k.double(), v.double(), causal, kpm, scale)
        plain = plain_torch(q, k, v, causal, kpm, scale)
        close_2x(out, expect, plain, what=what)
    else:
        ref32 = ref.attention(q.float(), k.float(), v.float(), causal, kpm, scale)
        close_2x(out, ref32, plain_torch(q, k, v, causal, kpm, scale), what=what)


SWEEP = [
    (S, D, causal, dtype)
    for S in (1, 17, 97, 129, 256)
    for D in (32, 64, 80, 128)
    for causal in (False, True)
    for dtype in DTYPES
]


SWEEP_IDS = [f"S{s}-D{d}-{'c' if c else 'f'}-{str(t)[6:]}" for s, d, c, t in SWEEP]


@pytest.mark.sweep
@pytest.mark.parametrize("S,D,causal,dtype", SWEEP, ids=SWEEP_IDS)
def test_attention_sweep(device, S, D, causal, dtype):
    i = SWEEP.index((S, D, causal, dtype))
    B, H = BH[i % len(BH)]
    q, k, v = (torch.randn(B, H, S, D, device=device).to(dtype) for _ in range(3))
    kpm = None
    if i % 2:  # half the cases with a key padding mask; key 0 stays so no row is empty
        kpm = torch.rand(B, S, device=device) > 0.3
        kpm[:, 0] = True
    check(q, k, v, causal, kpm, what=f"B{B} H{H} S{S} D{D} causal={causal} {dtype}")


@pytest.mark.parametrize("sq,sk", [(1, 129), (17, 97), (64, 300), (97, 97)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_causal_with_fewer_queries_aligns_to_the_end(device, sq, sk, dtype):
    q = torch.randn(2, 3, sq, 64, device=device).to(dtype)
    k, v = (torch.randn(2, 3, sk, 64, device=device).to(dtype) for _ in range(2))
    check(q, k, v, True, None, what=f"chunked prefill {sq}x{sk}")


@pytest.mark.parametrize("launch", [Launch({"BLOCK_M": 16, "BLOCK_N": 16}, 4, 2),
                                    Launch({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 2),
                                    Launch({"BLOCK_M": 128, "BLOCK_N": 32}, 8, 2)], ids=["16x16", "32x64", "128x32"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_shapes(device, launch, causal):
    """Other tiles than the heuristic's: BLOCK_M != BLOCK_N moves the causal diagonal band."""
    q, k, v = (torch.randn(2, 2, 77, 48, device=device) for _ in range(3))
    kpm = torch.rand(2, 77, device=device) > 0.2
    kpm[:, 0] = True
    check(q, k, v, causal, kpm, launch=launch, what=str(launch.blocks))


@pytest.mark.parametrize("D", [16, 40, 96, 128])
def test_odd_head_dims(device, D):
    q, k, v = (torch.randn(1, 2, 33, D, device=device) for _ in range(3))
    check(q, k, v, False, None, what=f"D{D}")


def test_strided_fused_qkv_views_and_output_layout(device):
    B, S, H, D = 2, 45, 3, 32
    qkv = torch.randn(B, S, 3, H, D, device=device)  # as a fused QKV projection lays it out
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, S, D) views, no copies
    assert not q.is_contiguous()
    with fastlm.use_backend("triton"):
        out = ops.attention(q, k, v, causal=True)
    assert out.transpose(1, 2).is_contiguous()  # (B, S, H, D) memory: free reshape to (B, S, H*D)
    assert max_err(out, ref.attention(q, k, v, True)) < 1e-5


def test_fully_masked_rows_are_zero_and_finite(device):
    q, k, v = (torch.randn(2, 2, 20, 32, device=device, dtype=torch.float16) for _ in range(3))
    kpm = torch.ones(2, 20, dtype=torch.bool, device=device)
    kpm[1] = False  # batch 1 has no key at all
    out = run_kernel(q, k, v, False, kpm, 32**-0.5)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0
    # causal with more queries than keys: the first rows see nothing
    qq = torch.randn(1, 1, 30, 32, device=device)
    kk, vv = (torch.randn(1, 1, 10, 32, device=device) for _ in range(2))
    out = run_kernel(qq, kk, vv, True, None, 32**-0.5)
    assert out[0, 0, :20].abs().max() == 0
    assert max_err(out, ref.attention(qq, kk, vv, True)) < 1e-5


def test_logits_near_fp16_max_stay_finite(device):
    q = torch.full((1, 2, 33, 64), 30.0, device=device, dtype=torch.float16)
    k = torch.full((1, 2, 33, 64), 30.0, device=device, dtype=torch.float16)
    k[..., ::3, :] = -30.0  # q.k = +-57600 * scale: raw products near fp16's 65504
    v = torch.randn(1, 2, 33, 64, device=device, dtype=torch.float16)
    out = run_kernel(q, k, v, False, None, 1.0)
    assert torch.isfinite(out).all()
    expect = ref.attention(q.float(), k.float(), v.float(), False, None, 1.0)
    assert max_err(out, expect) < 1e-2


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_equals_padded(device, causal, dtype):
    lens = [17, 1, 64, 33]
    B, H, D, S = len(lens), 3, 64, max(lens)
    x = torch.randn(B, S, 3, H, D, device=device).to(dtype)
    kpm = torch.arange(S, device=device)[None] < torch.tensor(lens, device=device)[:, None]
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
    padded = run_kernel(q, k, v, causal, kpm, D**-0.5)  # (B, H, S, D)
    packed = x[kpm]  # (T, 3, H, D)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    out = poison_(torch.empty(packed.shape[0], H, D, device=device, dtype=dtype))
    kernel.attention_varlen(packed[:, 0], packed[:, 1], packed[:, 2], cu, S, causal, D**-0.5, out=out)
    expect = padded.transpose(1, 2)[kpm]  # (T, H, D) valid rows
    assert torch.isfinite(out).all()
    assert max_err(out, expect) <= (1e-5 if dtype == torch.float32 else 2e-2)
    ref_packed = ref.attention_varlen(packed[:, 0].float(), packed[:, 1].float(), packed[:, 2].float(), cu, S, causal)
    assert max_err(out, ref_packed) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_public_op_dispatch_and_compile(device):
    q, k, v = (torch.randn(1, 2, 9, 16, device=device) for _ in range(3))
    with fastlm.use_backend("triton"):
        torch.library.opcheck(torch.ops.fastlm.attention, (q, k, v, True, None, 0.25))
        fn = torch.compile(lambda q, k, v: ops.attention(q, k, v, causal=True) * 2, fullgraph=True, backend="eager")
        assert max_err(fn(q, k, v), 2 * ref.attention(q, k, v, True)) < 1e-5
