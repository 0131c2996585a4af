"""The serve engine's batched decode step with static shapes, replayed from CUDA graphs on GPU.

Continuous batching runs a different number of sequences n at every step. On GPU, the op-by-op
step costs a few hundred kernel launches per token (~1-2 ms of host work at GPT-2 small), so the
step is captured once per *bucket* (powers of two up to the slot count, as vLLM's
``cudagraph_capture_sizes``) and replayed: the n running sequences are copied into the first n rows
of the bucket's static token / position buffers and the rows [n, bucket) are padding.

Padding rows never disturb a sequence. Batch row b is cache slot b (SlotKVCache keeps the running
sequences packed in slots [0, n)); a padding row writes one key / value row into its own slot:

- the slot of a prompt being prefilled in chunks (slot n, `rows` of it already in the cache) gets
  position `rows`, the row its next chunk writes anyway (a row < capacity: the prompt is unfinished);
- a free slot gets position 0: its rows are rewritten by the prefill of whatever joins it.

Each padding row attends to its own pos + 1 rows only, so it costs one short attention; its
logits are dropped. `FASTLM_SERVE_STATIC_STEP=1` runs this same padded, bucketed step eagerly
(without a graph) on any device: on CPU it is the GPU path's test twin (tests/test_serve_static.py).
`FASTLM_CUDA_GRAPHS=0` turns the graphs off (as in fastlm.generation)."""

from __future__ import annotations

import logging
import os

import torch

from fastlm import backend

log = logging.getLogger("fastlm.serve")


def wanted(device: torch.device) -> tuple[bool, bool]:
    """(use the static step, capture it in CUDA graphs) for a model on `device`, from the
    environment: CUDA -> graphs unless FASTLM_CUDA_GRAPHS=0; FASTLM_SERVE_STATIC_STEP=1 -> the
    static step eagerly (no graph) anywhere."""
    graphs = device.type == "cuda" and os.environ.get("FASTLM_CUDA_GRAPHS", "1") != "0"
    static = graphs or os.environ.get("FASTLM_SERVE_STATIC_STEP", "0") == "1"
    return static, graphs


def buckets(slots: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, ... below `slots`, and `slots` itself (ascending)."""
    if slots < 1:
        raise ValueError(f"buckets: slots must be >= 1, got {slots}")
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


class StaticSteps:
    """model.decode_step over the first `bucket` slots of a SlotKVCache with static input buffers,
    one captured CUDA graph per bucket when `graphs` (else run eagerly: the same arithmetic).

    __call__(tokens (n,) int64, pos (n,) int32, n, prefill) -> logits (n, vocab) in the model's
    logits dtype; prefill is (slot, rows) of a chunked prefill in progress, rows already in its
    cache slot (None when none is). Raises ValueError for n outside [1, slots]. The returned tensor
    is the graph's output buffer: read it before the next call."""

    def __init__(self, model, cache, graphs: bool):
        self.model, self.cache, self.graphs = model, cache, graphs
        dev = model.device
        self.sizes = buckets(cache.slots)
        # static inputs, the largest bucket's; bucket b uses their first b rows (a view: fixed address)
        self.tokens = torch.zeros(cache.slots, dtype=torch.long, device=dev)
        self.pos = torch.zeros(cache.slots, dtype=torch.int32, device=dev)
        self._graph: dict[int, torch.cuda.CUDAGraph] = {}
        self._out: dict[int, torch.Tensor] = {}
        self._pool = None  # one memory pool shared by every bucket's graph (they never run at once)

    def bucket(self, n: int) -> int:
        """The smallest captured batch size >= n."""
        for b in self.sizes:
            if b >= n:
                return b
        raise ValueError(f"StaticSteps: n must lie in [1, {self.sizes[-1]}], got {n}")

    def _eager(self, b: int) -> torch.Tensor:
        # kv_len None: every pos[i] < the cache's capacity; each row attends to its own pos + 1 rows.
        # On CPU (the test twin) the op-by-op torch path, the structure the GPU runs with its kernels
        # (the one-call CPU batch op needs a contiguous cache, which view(b < slots) is not).
        args = (self.tokens[:b], self.pos[:b], self.cache.view(b))
        if self.tokens.device.type == "cuda":
            return self.model.decode_step(*args)
        with backend.use_backend("torch"):
            return self.model.decode_step(*args)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, n: int,
                 prefill: tuple[int, int] | None) -> torch.Tensor:
        b = self.bucket(n)
        self.tokens[:n].copy_(tokens)
        self.pos[:n].copy_(pos)
        if b > n:
            self.tokens[n:b].zero_()
            self.pos[n:b].zero_()
            if prefill is not None and n <= prefill[0] < b:
                slot, rows = prefill  # a prompt being prefilled there: the row its next chunk writes
                self.pos[slot] = rows
        if not self.graphs:
            return self._eager(b)[:n]
        with torch.cuda.device(self.tokens.device):
            if b not in self._graph:
                self._capture(b)
            self._graph[b].replay()
        return self._out[b][:n]

    def _capture(self, b: int) -> None:
        # Warm up on a side stream (Triton JIT, allocator), then capture (as fastlm.generation's
        # Decoder). The warm-up writes cache rows at self.pos[:b]: the padding rows above, and for
        # the running rows the row this step writes again at replay.
        dev = self.tokens.device
        s = torch.cuda.Stream(device=dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            for _ in range(2):
                self._eager(b)
        torch.cuda.current_stream(dev).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            self._out[b] = self._eager(b)
        self._pool = g.pool()
        self._graph[b] = g
        log.info("fastlm serve: captured the decode step for a batch of %d in a CUDA graph", b)
