"""Static KV cache (gpt-fast style): fixed-size buffers allocated once per (batch, capacity)
and written by index, so every decode step has the same shapes (CUDA-graph friendly)."""

from __future__ import annotations

import torch
from torch import Tensor


class StaticKVCache:
    """K and V for every layer, (n_layer, B, H, capacity, D) each; layer i's cache is the
    contiguous view `k[i]` (B, H, capacity, D). Sequence b's valid rows are [0, its length);
    the lengths themselves live with the caller (decode positions)."""

    def __init__(self, n_layer: int, batch: int, n_head: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layer, batch, n_head, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def prefill(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write a prompt block k, v (B, H, T, D) into rows [0, T) of the first B sequences
        (a cache sized for a batch bucket may hold more)."""
        B, T = k.shape[0], k.shape[2]
        self.k[layer, :B, :, :T].copy_(k)
        self.v[layer, :B, :, :T].copy_(v)

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Write one token per sequence, k, v (B, H, 1, D), at row pos[b] (int (B,), on device)."""
        B, H, _, D = k.shape
        idx = pos.to(torch.int64).view(B, 1, 1, 1).expand(B, H, 1, D)
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
