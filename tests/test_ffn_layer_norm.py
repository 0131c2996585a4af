"""Triton prefill FFN (GEMMs with fused epilogues) and fused residual+LayerNorm against the
reference; poisoned outputs; the 2x rule for fp16/bf16."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm import reference as ref
from fastlm.kernels import ffn as ffn_kernel
from fastlm.kernels import layer_norm as ln_kernel
from fastlm.testing import check_ffn, close_2x, ffn_weights, max_err, poison_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.sweep
@pytest.mark.parametrize("M", [1, 17, 97, 129])
@pytest.mark.parametrize("d", [64, 80, 200])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ffn_fused_epilogues(device, M, d, dtype):
    act = "gelu" if (M + d) % 2 else "gelu_tanh"
    x = torch.randn(M, d, device=device).to(dtype)
    r = torch.randn(M, d, device=device).to(dtype) if M % 2 else None
    w1, b1, w2, b2 = ffn_weights(d, 4 * d, dtype, device)
    h = poison_(torch.empty(M, 4 * d, device=device, dtype=dtype))
    ffn_kernel.linear(x, w1, b1, act, out=h)
    y = poison_(torch.empty(M, d, device=device, dtype=dtype))
    ffn_kernel.linear(h, w2, b2, "none", r, out=y)
    check_ffn(y, x, w1, b1, w2, b2, act, r, fp32_floor=1e-5, what=f"ffn M{M} d{d} {dtype} {act}")


def test_ffn_op_three_dim_input_and_compile(device):
    x = torch.randn(2, 9, 48, device=device)
    w1, b1, w2, b2 = ffn_weights(48, 96, torch.float32, device)
    with fastlm.use_backend("triton"):
        y = ops.ffn(x, w1, b1, w2, b2, activation="gelu_tanh", residual=x)
        torch.library.opcheck(torch.ops.fastlm.ffn, (x, w1, b1, w2, b2, "gelu", None))
    assert max_err(y, ref.ffn(x, w1, b1, w2, b2, "gelu_tanh", x)) < 1e-4


@pytest.mark.sweep
@pytest.mark.parametrize("n", [1, 17, 768, 1025, 1600])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_layer_norm(device, n, dtype, with_residual):
    x = (torch.randn(3, 5, n, device=device) * 3 + 1).to(dtype)
    r = torch.randn(3, 5, n, device=device).to(dtype) if with_residual else None
    w, b = (1 + 0.1 * torch.randn(n, device=device)).to(dtype), torch.randn(n, device=device).to(dtype)
    y, s = poison_(torch.empty_like(x)), poison_(torch.empty_like(x))
    res = ln_kernel.layer_norm(x, w, b, 1e-5, r, out=y, out_sum=s)
    up = torch.float64 if dtype == torch.float32 else torch.float32
    if with_residual:
        out, summed = res
        e_out, e_sum = ref.layer_norm(x.to(up), w.to(up), b.to(up), 1e-5, r.to(up))
        close_2x(summed, e_sum, x + r, floor=1e-6 if dtype == torch.float32 else None, what="sum")
        plain = F.layer_norm(x + r, (n,), w, b, 1e-5)
    else:
        out = res
        e_out = ref.layer_norm(x.to(up), w.to(up), b.to(up), 1e-5)
        plain = F.layer_norm(x, (n,), w, b, 1e-5)
    close_2x(out, e_out, plain, floor=1e-5 if dtype == torch.float32 else None, what=f"layer_norm n{n} {dtype}")


def test_layer_norm_ops_dispatch(device):
    x, r = torch.randn(4, 64, device=device), torch.randn(4, 64, device=device)
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    with fastlm.use_backend("triton"):
        y, s = ops.layer_norm(x, w, b, 1e-5, residual=r)
        torch.library.opcheck(torch.ops.fastlm.add_layer_norm, (x, r, w, b, 1e-5))
        torch.library.opcheck(torch.ops.fastlm.layer_norm, (x, w, b, 1e-5))
    assert max_err(s, x + r) == 0 and max_err(y, F.layer_norm(x + r, (64,), w, b, 1e-5)) < 1e-5
