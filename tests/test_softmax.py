"""Triton fused softmax (one-pass and online) against the reference; poisoned outputs."""

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm import reference as ref
from fastlm.kernels import softmax as kernel
from fastlm.testing import close_2x, max_err, poison_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_kernel(x, dim, scale, mask):
    xt_shape = list(x.movedim(dim, -1).shape)
    out = poison_(torch.empty(xt_shape, dtype=x.dtype, device=x.device))
    res = kernel.softmax(x, dim % x.dim(), scale, mask, out=out)
    if dim % x.dim() == x.dim() - 1:
        assert res.data_ptr() == out.data_ptr()
    return res


def check(x, dim, scale, mask, what=""):
    out = run_kernel(x, dim, scale, mask)
    up = torch.float64 if x.dtype == torch.float32 else torch.float32
    mref = mask.to(up) if mask is not None and mask.dtype != torch.bool else mask
    expect = ref.softmax(x.to(up), dim, scale, mref)
    plain = torch.softmax(x * scale + (mask if mask is not None and mask.dtype != torch.bool else 0), dim)
    if mask is not None and mask.dtype == torch.bool:
        plain = torch.softmax((x * scale).masked_fill(~mask, float("-inf")), dim).nan_to_num(0.0)
    close_2x(out, expect, plain, what=what)


@pytest.mark.sweep
@pytest.mark.parametrize("n", [1, 17, 97, 129, 1025, 8192, 20000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_softmax_rows(device, n, dtype, mask_kind):
    rows = 3 if n > 4096 else 7
    x = (torch.randn(2, rows, n, device=device) * 4).to(dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(1, rows, n, device=device) > 0.4  # broadcasts over dim 0 through stride 0
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(n, device=device).to(dtype)  # additive, broadcast over rows
    check(x, -1, 0.7, mask, what=f"n{n} {dtype} {mask_kind}")


def test_fully_masked_rows_are_zero(device):
    x = torch.randn(4, 300, device=device, dtype=torch.float16)
    m = torch.rand(4, 300, device=device) > 0.5
    m[2] = False
    out = run_kernel(x, -1, 1.0, m)
    assert torch.isfinite(out).all() and out[2].abs().max() == 0
    x = torch.randn(2, 10000, device=device)  # the online kernel too
    m = torch.zeros(2, 10000, dtype=torch.bool, device=device)
    m[0, 5] = True
    out = run_kernel(x, -1, 1.0, m)
    assert out[1].abs().max() == 0 and abs(out[0, 5].item() - 1.0) < 1e-6


def test_large_logits_and_other_dims(device):
    x = torch.full((3, 40), 60000.0, device=device, dtype=torch.float16)
    x[:, ::2] = -60000.0
    out = run_kernel(x, -1, 1.0, None)
    assert torch.isfinite(out).all()
    assert max_err(out, ref.softmax(x.float(), -1, 1.0, None)) < 1e-3
    y = torch.randn(5, 33, 4, device=device)
    with fastlm.use_backend("triton"):
        out = ops.softmax(y, dim=1, scale=2.0)
    assert max_err(out, torch.softmax(y * 2, 1)) < 1e-6
    z = torch.randn(2, 3, 4, 5, 37, device=device)  # rank 5: leading dims collapse
    m = torch.rand(3, 1, 5, 37, device=device) > 0.5
    check(z, -1, 1.0, m, what="rank 5 with a broadcast mask")


def test_opcheck(device):
    x = torch.randn(3, 50, device=device)
    torch.library.opcheck(torch.ops.fastlm.softmax, (x, 1, 0.5, torch.rand(3, 50, device=device) > 0.5))
