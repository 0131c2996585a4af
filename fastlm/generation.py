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
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Settings:
    """Generation arguments after resolution: explicit argument, else the model's generation_config
    (the checkpoint's generation_config.json, or the transformers model's), else its config, else
    the default below."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: tuple[int, ...] = ()  # empty: no end-of-sequence stop
    pad_token_id: int | None = None  # for finished sequences; default: the first eos id
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0


FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
          "min_new_tokens", "repetition_penalty")


def resolve(model, prompt_len: int, **explicit) -> Settings:
    """Settings for one call: each argument given (not None) wins; else the model's
    `generation_config` (fastlm.from_pretrained attaches the checkpoint's); a model without one
    reads the same names from its config; else Settings' defaults. eos_token_id may be an int or a
    list of ints. Without max_new_tokens, the generation config's max_new_tokens, else its
    max_length minus the prompt length (as transformers counts it), is used. A generation config's
    min_length (prompt included) raises min_new_tokens as transformers' MinLengthLogitsProcessor
    does. Raises ValueError / TypeError naming a bad argument, before any work."""
    name = "generate"
    source = getattr(model, "generation_config", None)
    if source is None:
        source = model.config
    got = {}
    for f in FIELDS:
        v = explicit.get(f)
        got[f] = v if v is not None else getattr(source, f, None)
    if got["max_new_tokens"] is None:
        max_length = getattr(source, "max_length", None)
        if max_length is None:
            raise ValueError(f"{name}: max_new_tokens is required (the model's generation config sets neither "
                             "max_new_tokens nor max_length)")
        got["max_new_tokens"] = max_length - prompt_len
    n = got["max_new_tokens"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name}: max_new_tokens must be an int >= 1, got {n!r}")
    vocab = model.config.vocab_size
    eos = got["eos_token_id"]
    eos = () if eos is None else (eos,) if isinstance(eos, int) and not isinstance(eos, bool) else eos
    limit = vocab if explicit.get("eos_token_id") is not None else float("inf")
    if not isinstance(eos, (list, tuple)) or not all(
            isinstance(e, int) and not isinstance(e, bool) and 0 <= e < limit for e in eos):
        raise ValueError(f"{name}: eos_token_id must be a token id in [0, {vocab}) or a list of them, "
                         f"got {got['eos_token_id']!r}")
    eos = tuple(int(e) for e in eos)
    if explicit.get("eos_token_id") is None:  # from the checkpoint: ids past the vocabulary never come
        eos = tuple(e for e in eos if e < vocab)
    pad = got["pad_token_id"]
    if pad is None and eos:
        pad = eos[0]  # as transformers does when a model has no pad token
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 0):
        raise ValueError(f"{name}: pad_token_id must be an int >= 0, got {pad!r}")
    do_sample = bool(got["do_sample"]) if got["do_sample"] is not None else False
    out = {"max_new_tokens": n, "do_sample": do_sample, "eos_token_id": eos, "pad_token_id": pad}
    for f, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_new_tokens", 0),
                       ("repetition_penalty", 1.0)):
        out[f] = default if got[f] is None else got[f]
    t, k, p, m, r = (out[f] for f in ("temperature", "top_k", "top_p", "min_new_tokens", "repetition_penalty"))
    if do_sample:
        if not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"{name}: temperature must be > 0 when sampling, got {t!r}")
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"{name}: top_k must be an int >= 0 (0 = off), got {k!r}")
        if not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"{name}: top_p must lie in (0, 1], got {p!r}")
    if not isinstance(m, int) or isinstance(m, bool) or m < 0:
        raise ValueError(f"{name}: min_new_tokens must be an int >= 0, got {m!r}")
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 < r < float("inf"):
        raise ValueError(f"{name}: repetition_penalty must be a finite float > 0 (1.0 = off), got {r!r}")
    min_length = getattr(source, "min_length", None)  # transformers applies both
    if isinstance(min_length, int) and not isinstance(min_length, bool) and min_length > 0:
        out["min_new_tokens"] = max(m, min_length - prompt_len)
    out["temperature"], out["top_p"], out["repetition_penalty"] = float(t), float(p), float(r)
    return Settings(**out)


def check_args(model, input_ids, attention_mask, **explicit) -> Settings:
    """Every bad argument raises ValueError / TypeError naming it, before any work."""
    cfg = model.config
    check_ids("generate", input_ids, cfg.vocab_size, cfg.n_positions, attention_mask)
    return resolve(model, input_ids.shape[1], **explicit)


def process(logits: Tensor, s: Settings, step: int, seen: Tensor | None, eos: Tensor | None) -> Tensor:
    """transformers' logits processors, in its order, on the device (no host sync): the repetition
    penalty over the tokens seen so far (seen (B, V) bool: the prompt's real tokens and the
    generated ones), then end-of-sequence ids at -inf until min_new_tokens tokens are made.
    logits (B, V) in float32, as transformers processes them."""
    if seen is not None:  # RepetitionPenaltyLogitsProcessor: score < 0 ? score * p : score / p
        p = s.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
    if eos is not None and step < s.min_new_tokens:  # MinNewTokensLengthLogitsProcessor
        logits = logits.index_fill(1, eos, float("-inf"))
    return logits


def sample(logits: Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> Tensor:
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
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.use_graph = model.device.type == "cuda" and os.environ.get("FASTLM_CUDA_GRAPHS", "1") != "0"
        self.busy = False  # a generation is using the cache (set and cleared by _decoder / _run)

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


class _Decoders(OrderedDict):
    """A model's decoders, newest last. They are scratch state tied to that one model object (each
    holds it weakly): a copy of the model (copy.deepcopy, pickle / torch.save) starts with none,
    instead of decoding through the original's decoders (the original's weights, or a dead
    reference once it is gone) or failing to pickle the weak reference."""

    def __deepcopy__(self, memo) -> _Decoders:
        return _Decoders()

    def __reduce__(self):
        return _Decoders, ()


_DECODERS_LOCK = threading.Lock()


def _decoder(model, batch: int, capacity: int) -> Decoder:
    """A decoder for this (batch, capacity), marked busy: the caller clears `busy` when its
    generation ends. The model's cached one when it is free; while another generation holds it
    (a second stream in flight, another thread), a fresh one that is not kept."""
    with _DECODERS_LOCK:
        decoders = model.__dict__.get("_fastlm_decoders")
        if not isinstance(decoders, _Decoders):
            decoders = model.__dict__["_fastlm_decoders"] = _Decoders()
        key = (batch, capacity, model.dtype, str(model.device))
        if key in decoders and decoders[key].model is not model:  # copied some other way (copy.copy)
            decoders.clear()
        if key in decoders:
            decoders.move_to_end(key)
            dec = decoders[key]
            if dec.busy:  # in use by a generation still in flight: this one gets its own cache
                dec = Decoder(model, batch, capacity)
        else:
            while len(decoders) >= KEEP_DECODERS:
                decoders.popitem(last=False)
            dec = decoders[key] = Decoder(model, batch, capacity)
        dec.busy = True
        return dec


@torch.inference_mode()
def _run(model, input_ids, attention_mask, s: Settings, seed, check_every) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields (new tokens (B,), finished (B,) bool) per step."""
    device = model.device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    lens = mask.sum(1)  # (B,)
    lens_host = lens.tolist()  # one sync per call, for sizes
    if min(lens_host) == 0:
        raise ValueError(f"generate: attention_mask row {lens_host.index(0)} has no tokens (empty prompt)")
    T = max(lens_host)
    n_pos = model.config.n_positions
    if T + s.max_new_tokens > n_pos:
        raise ValueError(f"generate: prompt ({T} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds the model's "
                         f"{n_pos} positions")
    B, V = ids.shape[0], model.config.vocab_size
    # left-align: real tokens first, in order (a stable sort of the padding flags)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :T]
    ids_l, kpm = ids.gather(1, order), mask.gather(1, order)  # (B, T)
    capacity = min(-(-(T + s.max_new_tokens) // CAPACITY_BUCKET) * CAPACITY_BUCKET, n_pos)
    dec = _decoder(model, batch_bucket(model, B), capacity)  # rows past B are idle padding; busy until we end
    try:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        eos = torch.tensor(s.eos_token_id, dtype=torch.long, device=device) if s.eos_token_id else None
        seen = None
        if s.repetition_penalty != 1.0:  # (B, V) tokens seen so far: the prompt's real ones to start
            seen = torch.zeros(B, V + 1, dtype=torch.bool, device=device)
            seen = seen.scatter_(1, ids.masked_fill(~mask, V), True)[:, :V]  # padding goes to column V, dropped

        logits = model.prefill(ids_l, kpm if not bool(kpm.all()) else None, dec.cache)  # (B, T, V)
        logits = logits[torch.arange(B, device=device), lens - 1]  # (B, V): each prompt's last token
        dec.pos.zero_()  # idle bucket rows decode token 0 from position 0 onwards; nobody reads them
        dec.tokens.zero_()
        dec.pos[:B].copy_(lens.to(torch.int32))
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(s.max_new_tokens):
            logits = process(logits.float(), s, step, seen, eos)
            nxt = sample(logits, s.do_sample, s.temperature, s.top_k, s.top_p, generator)
            if eos is not None:
                nxt = torch.where(finished, torch.full_like(nxt, s.pad_token_id), nxt)
                finished = finished | torch.isin(nxt, eos)
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            yield nxt, finished
            if step == s.max_new_tokens - 1:
                break
            if eos is not None and step % check_every == check_every - 1 and bool(finished.all()):
                break
            dec.tokens[:B].copy_(nxt)
            logits = dec.step(kv_len=T + step + 1)[:B]
            dec.pos.add_(1)
    finally:
        dec.busy = False


_DOC_ARGS = """
    Arguments left as None come from the checkpoint: the model's generation_config (what
    fastlm.from_pretrained read from generation_config.json, or the transformers model's), else
    its config, else the defaults (greedy, temperature 1, top_k 0 = off, top_p 1, no eos,
    min_new_tokens 0, repetition_penalty 1 = off). Explicit arguments override.
    max_new_tokens: new tokens at most (default: the generation config's max_new_tokens, else its
        max_length minus the prompt length; an error when it has neither).
    eos_token_id: an id or a list of ids; a sequence that makes one has finished, is padded with
        pad_token_id (default: the first eos id) and generation stops when all have finished.
    min_new_tokens: the eos ids cannot be chosen before this many new tokens (transformers'
        MinNewTokensLengthLogitsProcessor).
    repetition_penalty: p > 0; the logit of every token in the prompt (its real tokens) or made so
        far becomes logit * p if negative, else logit / p (transformers'
        RepetitionPenaltyLogitsProcessor). Applied before min_new_tokens and sampling.
    Raises ValueError / TypeError naming a bad argument before any work."""


def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, *,
             max_new_tokens: int | None = None, do_sample: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             min_new_tokens: int | None = None, repetition_penalty: float | None = None,
             seed: int | None = None, check_every: int = 8) -> Tensor:
    """input_ids (B, S) (+ attention_mask, either padding side) -> (B, S + new) LongTensor: the
    input as given, then the new tokens. Greedy output equals transformers' generate with the same
    arguments (fp32)."""
    s = check_args(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                   pad_token_id=pad_token_id, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    steps, done = [], []
    for nxt, fin in _run(model, input_ids, attention_mask, s, seed, check_every):
        steps.append(nxt)
        done.append(fin)
    new = torch.stack(steps, 1)  # (B, n)
    if s.eos_token_id:
        all_done = torch.stack(done, 1).all(0).tolist()  # (n,) after each step
        if True in all_done:
            new = new[:, : all_done.index(True) + 1]  # stop at the step the last sequence ended
    return torch.cat([input_ids.to(new.device), new], 1)


def stream(model, input_ids: Tensor, attention_mask: Tensor | None = None, *,
           max_new_tokens: int | None = None, do_sample: bool | None = None,
           temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
           eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
           min_new_tokens: int | None = None, repetition_penalty: float | None = None,
           seed: int | None = None) -> Iterator[Tensor]:
    """Yields the new tokens (B,) of each step as they are made (on the CPU), until every
    sequence has finished or max_new_tokens."""
    s = check_args(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                   pad_token_id=pad_token_id, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    return _stream(model, input_ids, attention_mask, s, seed)


def _stream(model, input_ids, attention_mask, s: Settings, seed) -> Iterator[Tensor]:
    for nxt, fin in _run(model, input_ids, attention_mask, s, seed, check_every=1):
        yield nxt.cpu()
        if s.eos_token_id and bool(fin.all()):
            return


generate.__doc__ += _DOC_ARGS
stream.__doc__ += _DOC_ARGS
