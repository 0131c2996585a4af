"""Generation for fastlm.GPT2LMHeadModel: prefill through the fused attention into a static KV
cache, then one static-shape decode step per token, replayed from a CUDA graph on GPU (run
eagerly on CPU), with sampling on the device.

Prompts of different lengths may be padded on either side (attention_mask says which tokens are
real): they are left-aligned once, so sequence b's tokens sit at positions 0..len_b-1, exactly the
positions transformers gives a left-padded prompt. Each sequence then decodes at its own position.
The only host syncs in the loop are the stop check every `check_every` tokens and streaming.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from typing import Iterator, Optional

import torch
from torch import Tensor

from fastlm.cache import StaticKVCache
from fastlm.models.common import check_ids

log = logging.getLogger("fastlm")
CAPACITY_BUCKET = 256  # cache rows are rounded up to this, so nearby lengths share a cache + graph
KEEP_DECODERS = 2  # decoders (cache + graph) kept per model


def batch_bucket(model, batch: int) -> int:
    """Rows of the static decode buffers: with CUDA graphs (or FASTLM_BATCH_BUCKETS=1) the next
    power of two, so batch sizes 5..8 share one captured graph; eager CPU decoding uses the batch
    itself (padding rows would be real work there)."""
    graphs = model.device.type == "cuda" and os.environ.get("FASTLM_CUDA_GRAPHS", "1") != "0"
    if graphs or os.environ.get("FASTLM_BATCH_BUCKETS", "0") == "1":
        return 1 << (batch - 1).bit_length()
    return batch


def check_args(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
               eos_token_id) -> None:
    """Every bad argument raises ValueError / TypeError naming it, before any work."""
    name = "generate"
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"{name}: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    cfg = model.config
    check_ids(name, input_ids, cfg.vocab_size, cfg.n_positions, attention_mask)
    if do_sample:
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"{name}: temperature must be > 0 when sampling, got {temperature!r}")
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"{name}: top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"{name}: top_p must lie in (0, 1], got {top_p!r}")
    if eos_token_id is not None and not (isinstance(eos_token_id, int) and 0 <= eos_token_id < cfg.vocab_size):
        raise ValueError(f"{name}: eos_token_id must be a token id in [0, {cfg.vocab_size}), got {eos_token_id!r}")


def sample(logits: Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
           generator: Optional[torch.Generator]) -> Tensor:
    """Next token per row of logits (B, V), on the device. Sampling draws Gumbel-style
    (argmax of p / Exp(1)), which needs no host sync and follows `generator`."""
    if not do_sample:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = x.sort(dim=-1, descending=True)
        p = srt.softmax(-1)
        drop = p.cumsum(-1) - p > top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


class Decoder:
    """Cache, static input buffers and (on GPU) the captured decode step for one
    (batch, capacity). Reused across generate calls with the same sizes."""

    def __init__(self, model, batch: int, capacity: int):
        cfg = model.config
        self._model = weakref.ref(model)  # the model owns its decoders; no cycle keeps either alive
        self.cache = StaticKVCache(cfg.n_layer, batch, cfg.n_head, cfg.n_embd // cfg.n_head, capacity,
                                   model.dtype, model.device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=model.device)
        self.pos = torch.zeros(batch, dtype=torch.int32, device=model.device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[Tensor] = None
        self.use_graph = model.device.type == "cuda" and os.environ.get("FASTLM_CUDA_GRAPHS", "1") != "0"

    @property
    def model(self):
        return self._model()

    def step(self, kv_len: int) -> Tensor:
        """Logits (B, V) for self.tokens at self.pos; the token's K/V is written into the cache."""
        if not self.use_graph:
            return self.model.decode_step(self.tokens, self.pos, self.cache, kv_len)
        with torch.cuda.device(self.tokens.device):  # the model's GPU, whichever is current
            if self.graph is None:
                self._capture()
            self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        # Warm up on a side stream (Triton JIT, allocator), then capture. The warm-up writes the
        # cache rows at self.pos, which the first real step writes again. Stream, graph and its
        # memory pool live on the model's device (the caller made it current).
        dev = self.tokens.device
        s = torch.cuda.Stream(device=dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            for _ in range(2):
                self.model.decode_step(self.tokens, self.pos, self.cache)
        torch.cuda.current_stream(dev).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model.decode_step(self.tokens, self.pos, self.cache)


def _decoder(model, batch: int, capacity: int) -> Decoder:
    decoders: OrderedDict = model.__dict__.setdefault("_fastlm_decoders", OrderedDict())
    key = (batch, capacity, model.dtype, str(model.device))
    if key in decoders:
        decoders.move_to_end(key)
        return decoders[key]
    while len(decoders) >= KEEP_DECODERS:
        decoders.popitem(last=False)
    decoders[key] = Decoder(model, batch, capacity)
    return decoders[key]


@torch.inference_mode()
def _run(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
         seed, check_every) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields (new tokens (B,), finished (B,) bool) per step."""
    check_args(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id)
    device = model.device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    lens = mask.sum(1)  # (B,)
    lens_host = lens.tolist()  # one sync per call, for sizes
    if min(lens_host) == 0:
        raise ValueError(f"generate: attention_mask row {lens_host.index(0)} has no tokens (empty prompt)")
    T = max(lens_host)
    n_pos = model.config.n_positions
    if T + max_new_tokens > n_pos:
        raise ValueError(f"generate: prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{n_pos} positions")
    B = ids.shape[0]
    # left-align: real tokens first, in order (a stable sort of the padding flags)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :T]
    ids_l, kpm = ids.gather(1, order), mask.gather(1, order)  # (B, T)
    capacity = min(-(-(T + max_new_tokens) // CAPACITY_BUCKET) * CAPACITY_BUCKET, n_pos)
    dec = _decoder(model, batch_bucket(model, B), capacity)  # rows past B are idle padding
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos_token_id

    logits = model.prefill(ids_l, kpm if not bool(kpm.all()) else None, dec.cache)  # (B, T, V)
    logits = logits[torch.arange(B, device=device), lens - 1]  # (B, V): each prompt's last token
    dec.pos.zero_()  # idle bucket rows decode token 0 from position 0 onwards; nobody reads them
    dec.tokens.zero_()
    dec.pos[:B].copy_(lens.to(torch.int32))
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = sample(logits, do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            finished = finished | (nxt == eos_token_id)
        yield nxt, finished
        if step == max_new_tokens - 1:
            break
        if eos_token_id is not None and step % check_every == check_every - 1 and bool(finished.all()):
            break
        dec.tokens[:B].copy_(nxt)
        logits = dec.step(kv_len=T + step + 1)[:B]
        dec.pos.add_(1)


def generate(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: Optional[int] = None, seed: Optional[int] = None, check_every: int = 8) -> Tensor:
    """input_ids (B, S) (+ attention_mask, either padding side) -> (B, S + new) LongTensor: the
    input as given, then the new tokens. Greedy output equals transformers' generate. With
    eos_token_id, a finished sequence is padded (config.pad_token_id, else eos) and generation
    stops when every sequence has finished."""
    steps, done = [], []
    for nxt, fin in _run(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                         eos_token_id, seed, check_every):
        steps.append(nxt)
        done.append(fin)
    new = torch.stack(steps, 1)  # (B, n)
    if eos_token_id is not None:
        all_done = torch.stack(done, 1).all(0).tolist()  # (n,) after each step
        if True in all_done:
            new = new[:, : all_done.index(True) + 1]  # stop at the step the last sequence ended
    return torch.cat([input_ids.to(new.device), new], 1)


def stream(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, max_new_tokens: int,
           do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           eos_token_id: Optional[int] = None, seed: Optional[int] = None) -> Iterator[Tensor]:
    """Yields the new tokens (B,) of each step as they are made (on the CPU), until every
    sequence has finished or max_new_tokens."""
    for nxt, fin in _run(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                         eos_token_id, seed, check_every=1):
        yield nxt.cpu()
        if eos_token_id is not None and bool(fin.all()):
            return
