"""Prefill FFN: GEMMs with their epilogues fused (Triton, tensor cores).

GEMM1 applies bias + GELU (erf for BERT, tanh for GPT-2) in registers before its one store of
the d_ff activation; GEMM2 adds bias and the residual before its store: no extra pass over
either activation. Why Triton and not cuBLASLt: cuBLASLt's GELU epilogue is the tanh form only
(BERT needs erf), its headers are not on our CPU build machines, and a Triton GEMM runs in the
interpreter on CPU (tested here) and compiles ahead of time for sm_80/sm_90 (wgmma on sm_90).
The decode FFN (few rows) is the CUDA GEMV path in csrc/cuda/ffn.cu.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import (
    AOTConfig,
    Ptr,
    capability,
    device_guard,
    interpreting,
    linear_launch,
    linear_launch_space,
    register_aot,
    triton_dtype,
)

ACT = {"none": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _linear_epilogue(X, W, Bias, R, Y, M, N, K,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn, stride_ym, stride_yn,
                     ACT: tl.constexpr, HAS_RES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Y = act(X @ W^T + bias) (+ R). X (M, K), W (N, K) as nn.Linear stores it."""
    pid = tl.program_id(0)  # one axis: tiles of M x N (row offsets below are 64-bit)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # grouped order: neighbouring programs share W tiles in L2
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N) of W^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        a = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    n_ok = offs_n < N
    acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if ACT == 2:  # tanh(u) = 2 sigmoid(2u) - 1 (no libdevice call: runs in the interpreter too)
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = 0.5 * acc * (2.0 * tl.sigmoid(2.0 * inner))
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(R + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :] * stride_rn, mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=mask)


def linear(x2d: torch.Tensor, w: torch.Tensor, b: torch.Tensor, act: str = "none",
           residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x2d @ w^T + b) (+ residual) for x2d (M, K), w (N, K); residual (M, N)."""
    M, K = x2d.shape
    N = w.shape[0]
    cfg = linear_launch(M, N, x2d.dtype, capability(x2d), residual is not None)
    y = torch.empty(M, N, dtype=x2d.dtype, device=x2d.device) if out is None else out
    r = residual if residual is not None else y
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    with device_guard(x2d):
        _linear_epilogue[grid](x2d, w, b, r, y, M, N, K, *x2d.stride(), *w.stride(), *r.stride(), *y.stride(),
                               ACT=ACT[act], HAS_RES=residual is not None,
                               UPCAST=interpreting() and x2d.dtype == torch.bfloat16, IEEE=x2d.dtype == torch.float32,
                               **cfg.kwargs())
    return y


def ffn(x, w1, b1, w2, b2, activation: str, residual: torch.Tensor | None) -> torch.Tensor:
    """linear(act(linear(x, w1, b1)), w2, b2) (+ residual) with both epilogues fused."""
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    h = linear(x2d, w1, b1, activation)  # (M, d_ff): written once, already activated
    res = residual.reshape(-1, shape[-1]) if residual is not None else None
    return linear(h, w2, b2, "none", res).view(shape)


@register_aot("ffn")
def aot_configs() -> list[AOTConfig]:
    """GEMM1 (bias + GELU, erf for BERT and tanh for GPT-2, d_model 768 -> d_ff 3072) and GEMM2
    (bias + residual, 3072 -> 768) per row bucket, dtype and arch; row-major activations, weights
    in nn.Linear layout."""
    cfgs, seen = [], set()
    space = [(m, dt, cap, res, act) for m, dt, cap, res in linear_launch_space() for act in ((0,) if res else (1, 2))]
    for m, dtype, cap, res, act in space:
        N, K = (768, 3072) if res else (3072, 768)
        launch = linear_launch(m, N, dtype, cap, res)
        t = Ptr(triton_dtype(dtype))
        args = dict(X=t, W=t, Bias=t, R=t, Y=t, M=m + 5, N=N, K=K, stride_xm=K, stride_xk=1, stride_wn=K,
                    stride_wk=1, stride_rm=N, stride_rn=1, stride_ym=N, stride_yn=1)
        ce = dict(ACT=act, HAS_RES=res, **launch.blocks, UPCAST=False, IEEE=dtype == torch.float32)
        name = (f"ffn linear act{act} res{int(res)} {triton_dtype(dtype)} sm_{cap} {launch.blocks}"
                f" w{launch.num_warps} s{launch.num_stages}")
        if name not in seen:  # fp32 picks one tile for every M
            seen.add(name)
            cfgs.append(AOTConfig(name, _linear_epilogue, args, ce, launch.num_warps, launch.num_stages, cap,
                                  uses_dot=True, dtype=triton_dtype(dtype)))
    return cfgs
