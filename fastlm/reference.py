"""Pure-torch reference implementations of every fastlm op.

These are the ground truth the kernels are tested against and the CPU path of the
models. They favour clarity: reductions and nonlinearities run in float32 and the
result is cast back to the input dtype; matrix products run in the input dtype, as
plain torch does. Inputs are assumed valid (fastlm.ops validates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def up(t: Tensor) -> Tensor:
    """Upcast to float32 for the math (float64 stays float64, for fp64 ground truths)."""
    return t if t.dtype == torch.float64 else t.float()


def safe_softmax(s: Tensor, dim: int = -1) -> Tensor:
    """Softmax where a row with no finite entry (every key masked) gives 0, not NaN."""
    m = s.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=dim, keepdim=True)
    return e / torch.where(denom == 0, torch.ones_like(denom), denom)


def causal_keep(s_q: int, s_k: int, device: torch.device) -> Tensor:
    """(S_q, S_k) bool, True where query i may see key j; the query block is aligned to the
    end of the keys (query i sits at absolute position i + S_k - S_q), as in chunked prefill."""
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_k, device=device)[None, :]
    return j <= i + (s_k - s_q)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v over (B, H, S, D) tensors, in float32."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = torch.matmul(up(q), up(k).transpose(-1, -2)) * scale  # (B, H, S_q, S_k)
    keep = None
    if causal:
        keep = causal_keep(q.shape[-2], k.shape[-2], q.device)  # (S_q, S_k)
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]  # (B, 1, 1, S_k)
        keep = kpm if keep is None else keep & kpm
    if keep is None:
        p = torch.softmax(s, dim=-1)
    else:
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        p = p.masked_fill(~keep.any(-1, keepdim=True), 0.0)  # no visible key: 0, not NaN
    return torch.matmul(p, up(v)).to(q.dtype)  # (B, H, S_q, D_v)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Attention over packed sequences: q, k, v (T, H, D); sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1]. No token attends across sequences."""
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        qi = q[start:end].transpose(0, 1)[None]  # (1, H, L, D)
        ki = k[start:end].transpose(0, 1)[None]
        vi = v[start:end].transpose(0, 1)[None]
        out[start:end] = attention(qi, ki, vi, causal=causal, scale=scale)[0].transpose(0, 1)
    return out


def softmax(x: Tensor, dim: int = -1, scale: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """softmax(x * scale + mask) along `dim`; a bool mask keeps True, a float mask is added.
    Rows with every entry masked give 0."""
    s = up(x) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + up(mask)
    return safe_softmax(s, dim=dim).to(x.dtype)


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float | None = None
) -> Tensor:
    """One query token per sequence against the first cache_seqlens[b] cache rows. Rows past a
    sequence's length are zeroed before any product, so whatever an unfilled cache holds there
    (NaN, Inf) never reaches the output; a length of 0 gives 0."""
    pos = torch.arange(k_cache.shape[2], device=k_cache.device)
    keep = pos[None, :] < cache_seqlens.to(torch.long)[:, None]  # (B, S_max)
    rows = keep[:, None, :, None]  # (B, 1, S_max, 1)
    k = torch.where(rows, k_cache, 0)  # 0 * NaN would still be NaN after the softmax
    v = torch.where(rows, v_cache, 0)
    return attention(q, k, v, key_padding_mask=keep, scale=scale)


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    return F.gelu(up(x) + up(bias), approximate=approximate).to(x.dtype)


def ffn(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    activation: str = "gelu",
    residual: Tensor | None = None,
) -> Tensor:
    """linear(gelu(linear(x, w1) + b1), w2) + b2 (+ residual); weights in nn.Linear layout."""
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    h = F.gelu(up(F.linear(x, w1, b1)), approximate=approximate).to(x.dtype)
    y = F.linear(h, w2, b2)
    return y if residual is None else y + residual


def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Tensor | None = None
):
    """LayerNorm over the last dim with float32 statistics. With `residual`, normalises
    x + residual and returns (normed, x + residual)."""
    s = up(x) if residual is None else up(x) + up(residual)
    y = F.layer_norm(s, (x.shape[-1],), up(weight), up(bias), eps).to(x.dtype)
    if residual is None:
        return y
    return y, s.to(x.dtype)
