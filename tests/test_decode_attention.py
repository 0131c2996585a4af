"""Flash-decoding kernel against the reference: cache lengths 1..1025, split counts, per-sequence
lengths (0 included), dtypes, strided caches; outputs poisoned."""

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm import reference as ref
from fastlm.kernels import decode_attention as kernel
from fastlm.testing import close_2x, max_err, poison_


def plain(q, kc, vc, lens, scale):
    keep = torch.arange(kc.shape[2], device=q.device)[None] < lens.long()[:, None]
    s = (q @ kc.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~keep[:, None, None, :], float("-inf")), -1).nan_to_num(0.0)
    return (p.to(q.dtype) @ vc)


CASES = [(s_max, splits, dtype) for s_max in (1, 17, 300, 1025) for splits in (None, 1, 3, 64)
         for dtype in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.sweep
@pytest.mark.parametrize("s_max,splits,dtype", CASES, ids=[f"S{s}-sp{p}-{str(t)[6:]}" for s, p, t in CASES])
def test_decode_attention(device, s_max, splits, dtype):
    B, H, D = 3, 2, 64 if s_max % 2 else 80
    q = torch.randn(B, H, 1, D, device=device).to(dtype)
    kc, vc = (torch.randn(B, H, s_max, D, device=device).to(dtype) for _ in range(2))
    lens = torch.tensor([s_max, max(1, s_max // 3), max(1, s_max - 7)], dtype=torch.int32, device=device)
    out = poison_(torch.empty_like(q))
    kernel.decode_attention(q, kc, vc, lens, D**-0.5, num_splits=splits, out=out)
    if dtype == torch.float32:
        close_2x(out, ref.decode_attention(q.double(), kc.double(), vc.double(), lens, D**-0.5),
                 plain(q, kc, vc, lens, D**-0.5), what=f"S{s_max}")
    else:
        close_2x(out, ref.decode_attention(q.float(), kc.float(), vc.float(), lens, D**-0.5),
                 plain(q, kc, vc, lens, D**-0.5), what=f"S{s_max} {dtype}")


def test_empty_cache_rows_and_strided_cache(device):
    # a cache laid out (B, S_max, H, D) and viewed (B, H, S_max, D); one sequence with length 0
    store = torch.randn(2, 100, 4, 32, device=device)
    kc = store.transpose(1, 2)
    vc = torch.randn(2, 100, 4, 32, device=device).transpose(1, 2)
    q = torch.randn(2, 4, 1, 32, device=device)
    lens = torch.tensor([0, 57], dtype=torch.int32, device=device)
    out = poison_(torch.empty_like(q))
    kernel.decode_attention(q, kc, vc, lens, 0.2, out=out)
    assert torch.isfinite(out).all() and out[0].abs().max() == 0
    assert max_err(out, ref.decode_attention(q, kc, vc, lens, 0.2)) < 1e-5


def test_public_op(device):
    q = torch.randn(2, 3, 1, 16, device=device)
    kc, vc = (torch.randn(2, 3, 40, 16, device=device) for _ in range(2))
    lens = torch.tensor([40, 9], dtype=torch.int32, device=device)
    with fastlm.use_backend("triton"):
        out = ops.decode_attention(q, kc, vc, lens)
        torch.library.opcheck(torch.ops.fastlm.decode_attention, (q, kc, vc, lens, 0.25))
    assert max_err(out, ref.decode_attention(q, kc, vc, lens)) < 1e-5


# -- issue 12.5: rows past cache_seqlens never touch the output; lengths outside [0, S_max] raise

BACKENDS = ["auto", "torch", "triton"]  # auto on CPU tensors = the CPU path


def poisoned_caches(B, H, cap, D, lens, fill_k, fill_v, device, dtype=torch.float32):
    """Random caches, and the same caches with every row past lens[b] set to fill_k / fill_v
    (what an unfilled torch.empty cache may hold)."""
    kc, vc = (torch.randn(B, H, cap, D, device=device).to(dtype) for _ in range(2))
    past = torch.arange(cap, device=device)[None, :] >= lens.long()[:, None]  # (B, cap)
    rows = past[:, None, :, None]
    return kc, vc, kc.masked_fill(rows, fill_k), vc.masked_fill(rows, fill_v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fills", [("nan", "nan"), ("inf", "-inf"), ("-inf", "nan"), ("nan", "inf")])
def test_rows_past_the_length_never_reach_the_output(device, backend, fills):
    cap, H, D = 8, 2, 16
    lens = torch.arange(cap + 1, dtype=torch.int32, device=device)  # every length 0..capacity
    B = lens.numel()
    q = torch.randn(B, H, 1, D, device=device)
    kc, vc, kp, vp = poisoned_caches(B, H, cap, D, lens, float(fills[0]), float(fills[1]), device)
    expect = ref.decode_attention(q.double(), kc.double(), vc.double(), lens, 0.3)
    with fastlm.use_backend(backend):
        got = ops.decode_attention(q, kp, vp, lens, scale=0.3)
    assert torch.isfinite(got).all(), f"{backend}: poisoned rows leaked into the output"
    assert got[0].abs().max() == 0  # length 0 gives 0
    assert max_err(got, expect) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_poisoned_rows_low_precision_reference_and_kernel(device, dtype):
    cap, H, D = 17, 3, 32
    lens = torch.tensor([0, 1, 9, 16, 17], dtype=torch.int32, device=device)
    q = torch.randn(5, H, 1, D, device=device).to(dtype)
    kc, vc, kp, vp = poisoned_caches(5, H, cap, D, lens, float("nan"), float("inf"), device, dtype)
    expect = ref.decode_attention(q.float(), kc.float(), vc.float(), lens, D**-0.5)
    plain_out = plain(q, kc, vc, lens, D**-0.5)
    close_2x(ref.decode_attention(q, kp, vp, lens), expect, plain_out, what=f"reference {dtype}")
    out = poison_(torch.empty_like(q))
    kernel.decode_attention(q, kp, vp, lens, D**-0.5, out=out)
    close_2x(out, expect, plain_out, what=f"kernel {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_lengths_raise(device, backend):
    q = torch.randn(2, 3, 1, 16, device=device)
    kc = torch.randn(2, 3, 8, 16, device=device)
    with fastlm.use_backend(backend):
        for bad in ([5, 9], [-1, 3], [0, 2**31 - 1]):
            lens = torch.tensor(bad, dtype=torch.int32, device=device)
            with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 8\]"):
                ops.decode_attention(q, kc, kc, lens)
        ops.decode_attention(q, kc, kc, torch.tensor([0, 8], dtype=torch.int32, device=device))  # the edges are fine
