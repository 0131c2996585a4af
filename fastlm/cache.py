"""Static KV cache (gpt-fast style): fixed-size buffers allocated once per (batch, capacity)
and written by index, so every decode step has the same shapes (CUDA-graph friendly)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm import _ext


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
        _ext.copy_rows_(self.k[layer, :B, :, :T], k)  # CPU: no OpenMP region (csrc/copy_rows.cpp)
        _ext.copy_rows_(self.v[layer, :B, :, :T], v)

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Write one token per sequence, k, v (B, H, 1, D), at row pos[b] (int (B,), on device)."""
        B, H, _, D = k.shape
        idx = pos.to(torch.int64).view(B, 1, 1, 1).expand(B, H, 1, D)
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @classmethod
    def from_tensors(cls, k: Tensor, v: Tensor) -> StaticKVCache:
        """A cache over existing K and V buffers (n_layer, B, H, capacity, D) each, sharing their memory
        (no copy): how SlotKVCache hands a decode step the sequences it holds."""
        if k.dim() != 5 or k.shape != v.shape:
            raise ValueError(f"StaticKVCache.from_tensors: k and v must both be (n_layer, B, H, capacity, D), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        c = cls.__new__(cls)
        c.k, c.v = k, v
        return c


class SlotKVCache:
    """A static KV cache of `slots` sequences for continuous batching (fastlm serve), laid out as a
    StaticKVCache, (n_layer, slots, H, capacity, D) for K and for V (contiguous), so that

    - `full()` is the whole cache as one contiguous StaticKVCache: the one-call CPU decode steps
      (gpt2_decode_cpu for one sequence, the batched one for B sequences) read batch rows [0, B) of
      a contiguous cache with at least B rows;
    - `view(n)` is a StaticKVCache over the first n slots, (n_layer, n, H, capacity, D), a strided
      view, for the op-by-op decode step, whose batch must equal the cache's;
    - `slot(b)` is the StaticKVCache of slot b alone (batch 1, a strided view), for a prompt's
      prefill into that slot while the others keep their rows;
    - `move(src, dst, rows)` copies the first `rows` rows of every layer of slot src into slot dst,
      which keeps the running sequences packed in slots [0, n) when one in the middle leaves.

    Memory: 2 * slots * n_layer * H * capacity * D elements of `dtype`."""

    def __init__(self, n_layer: int, slots: int, n_head: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        self._full = StaticKVCache(n_layer, slots, n_head, head_dim, capacity, dtype, device)
        self.k, self.v = self._full.k, self._full.v

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def full(self) -> StaticKVCache:
        """Every slot, (n_layer, slots, H, capacity, D), contiguous."""
        return self._full

    def view(self, n: int) -> StaticKVCache:
        """The first n slots as one StaticKVCache (n_layer, n, H, capacity, D); 1 <= n <= slots."""
        if not 1 <= n <= self.slots:
            raise ValueError(f"SlotKVCache.view: n must lie in [1, {self.slots}], got {n}")
        return StaticKVCache.from_tensors(self.k[:, :n], self.v[:, :n])

    def slot(self, b: int) -> StaticKVCache:
        """Slot b alone, (n_layer, 1, H, capacity, D)."""
        if not 0 <= b < self.slots:
            raise ValueError(f"SlotKVCache.slot: b must lie in [0, {self.slots}), got {b}")
        return StaticKVCache.from_tensors(self.k[:, b:b + 1], self.v[:, b:b + 1])

    def move(self, src: int, dst: int, rows: int) -> None:
        """Copy rows [0, rows) of every layer and head of slot src into slot dst."""
        if src != dst and rows > 0:
            self.k[:, dst, :, :rows].copy_(self.k[:, src, :, :rows])
            self.v[:, dst, :, :rows].copy_(self.v[:, src, :, :rows])

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
