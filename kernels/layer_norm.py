"""Fused residual add + LayerNorm, one pass per row: the sum x + residual is formed in fp32,
written once (it is the next residual stream), and normalised with fp32 statistics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import AOT_CAPS, AOTConfig, Ptr, device_guard, layer_norm_launch, register_aot, triton_dtype


@triton.jit
def _add_layer_norm(X, R, W, B, Y, S, N, eps, stride_x, stride_r, stride_y, stride_s,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows on grid axis 0; 64-bit offsets
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(S + row * stride_s + cols, x.to(S.dtype.element_ty), mask=ok)
    mean = tl.sum(x, 0) / N
    xc = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / N + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=ok)


def layer_norm(x, weight, bias, eps: float, residual: torch.Tensor | None = None,
               out: torch.Tensor | None = None, out_sum: torch.Tensor | None = None):
    """Returns normed, or (normed, x + residual) with a residual. Rows are the last dim of x."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, N)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if out is None else out.view(-1, N)
    s = (torch.empty_like(y) if out_sum is None else out_sum.view(-1, N)) if residual is not None else y
    launch = layer_norm_launch(N)
    rr = r2 if r2 is not None else x2
    with device_guard(x2):
        _add_layer_norm[(x2.shape[0],)](x2, rr, weight, bias, y, s, N, float(eps), x2.stride(0), rr.stride(0),
                                        y.stride(0), s.stride(0), HAS_RES=residual is not None, **launch.kwargs())
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), s.view(x.shape)


@register_aot("layer_norm")
def aot_configs() -> list[AOTConfig]:
    """Hidden sizes across the block-size buckets, contiguous rows."""
    cfgs = []
    for cap in AOT_CAPS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for n, res in ((768, True), (1600, False), (8192, True)):
                launch = layer_norm_launch(n)
                t = Ptr(triton_dtype(dtype))
                args = dict(X=t, R=t, W=t, B=t, Y=t, S=t, N=n, eps=1e-5, stride_x=n, stride_r=n, stride_y=n,
                            stride_s=n)
                cfgs.append(AOTConfig(f"layer_norm N{n} res{int(res)} {triton_dtype(dtype)} sm_{cap}", _add_layer_norm,
                                      args, {"HAS_RES": res, **launch.blocks}, launch.num_warps, launch.num_stages,
                                      cap, dtype=triton_dtype(dtype)))
    return cfgs
