"""The engine thread that owns the model, and the tokenizer worker pool.

The asyncio event loop never runs a kernel or a tokenizer: tokenization and detokenization run in
a small thread pool (`Tokenizers`), model calls in one engine thread per server. Results go back to
the loop with `loop.call_soon_threadsafe`.

- `EncoderEngine` (embeddings, classification, reranking): dynamic batching. Every cycle takes all
  sequences waiting, sorts them by length and cuts them into batches of at most
  `max_batch_requests` sequences and `max_batch_tokens` padded tokens; a failing batch is rerun
  one sequence at a time so a bad input fails its own request alone.
- `GenerationEngine` (GPT-2): continuous batching on a `SlotKVCache`. Running sequences sit packed
  in slots [0, n); between two decode steps finished / cancelled / timed-out ones leave (the last
  slot's rows move into the hole) and waiting ones join: their prompt is prefilled into their own
  slot (at most max_prefill_tokens per step: a longer prompt in chunks over several steps), their
  first token sampled from it. One decode step then
  serves every running sequence (model.decode_step over the first n slots); each sequence keeps its
  own sampling settings, logits processors and seeded generator (fastlm.generation's resolve /
  State / process / choose), so a request's tokens equal model.generate's for the same prompt and
  arguments (greedy: token for token; sampled: the same draws for the same seed).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from fastlm.serve import static_step

log = logging.getLogger("fastlm.serve")

TASKS = ("embed", "classify", "rerank", "generate")


def detect_task(model_dir: str) -> str:
    """The task a checkpoint serves, from its config.architectures (transformers' class names):
    GPT2LMHeadModel (or a GPT-2 without architectures) -> generate; *ForSequenceClassification ->
    rerank when it has one label (a cross-encoder), else classify; anything else (BertModel, a
    sentence-transformers directory, GPT2Model) -> embed. Raises ValueError for heads not served
    (token classification, question answering, masked LM)."""
    from fastlm.embed import read_pipeline
    from fastlm.models.loading import _read_config

    st = os.path.exists(os.path.join(model_dir, "modules.json"))
    path = read_pipeline(model_dir).model_dir if st else model_dir
    config = _read_config(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    if st:
        return "embed"
    if config.model_type == "gpt2" and arch in (None, "GPT2LMHeadModel"):
        return "generate"
    if arch and arch.endswith("ForSequenceClassification"):
        return "rerank" if getattr(config, "num_labels", 2) == 1 else "classify"
    if arch and arch.endswith(("ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM")):
        raise ValueError(f"fastlm serve: {model_dir} is a {arch}, which fastlm serve does not serve yet "
                         "(it serves embeddings, sequence classification, reranking and GPT-2 generation); "
                         "pass --task embed to serve its encoder's embeddings")
    return "embed"


class Tokenizers:
    """A small thread pool that runs the tokenizer (and detokenizer) off the event loop."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastlm-tok")

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def shutdown(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


class EngineError(Exception):
    """A request failed inside the engine: status and message for the HTTP answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _deliver(loop, fut: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
    def put():
        if not fut.done():
            fut.set_exception(exc) if exc is not None else fut.set_result(result)

    try:
        loop.call_soon_threadsafe(put)
    except RuntimeError:  # the loop has closed (shutdown)
        pass


class _Base:
    """The thread, its inbox, load state and fatal error shared by both engines."""

    name = "engine"

    def __init__(self, metrics, device: str | None, dtype, quantize: str | None):
        self.metrics, self.device, self.dtype, self.quantize = metrics, device, dtype, quantize
        self.inbox: queue.Queue = queue.Queue()
        self.ready = False
        self.fatal: str | None = None  # a fatal engine error: /health answers 503
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"fastlm-{self.name}", daemon=True)
        self.load_error: BaseException | None = None

    def start(self):
        self._thread.start()

    def _main(self):
        try:
            self.load()
            self.ready = True
            log.info("fastlm serve: model loaded; serving")
        except BaseException as e:  # noqa: BLE001 - reported through /health and the log
            self.load_error = e
            self.fatal = f"the model failed to load: {type(e).__name__}: {e}"
            log.error("fastlm serve: %s", self.fatal)
            return
        try:
            with torch.inference_mode():
                self.loop()
        except BaseException as e:  # noqa: BLE001
            self.fatal = f"the engine stopped: {type(e).__name__}: {e}"
            log.exception("fastlm serve: fatal engine error")
            self.fail_all(EngineError(500, self.fatal))

    def stop(self, timeout: float = 5.0):
        self._stop.set()
        self.inbox.put(None)
        self._thread.join(timeout)

    def healthy(self) -> bool:
        return self.ready and self.fatal is None and self._thread.is_alive()

    def load(self):
        raise NotImplementedError

    def loop(self):
        raise NotImplementedError

    def fail_all(self, e: EngineError):
        raise NotImplementedError


# -- encoders ---------------------------------------------------------------------------------------
@dataclass
class EncodeJob:
    """One request's sequences: ids[i] token ids (list[int]), type_ids[i] (pairs) or None."""

    ids: list[list[int]]
    type_ids: list[list[int]] | None
    loop: asyncio.AbstractEventLoop
    fut: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    out: list = field(default_factory=list)
    left: int = 0
    failed: bool = False


class EncoderEngine(_Base):
    """Embeddings (the checkpoint's sentence-transformers pooling, as fastlm.Embedder), or the
    logits of a sequence-classification head (classify / rerank)."""

    name = "encoder"

    def __init__(self, model_dir: str, task: str, metrics, *, device=None, dtype=None, quantize=None,
                 max_batch_tokens: int = 16384, max_batch_requests: int = 64):
        super().__init__(metrics, device, dtype, quantize)
        self.model_dir, self.task = model_dir, task
        self.max_batch_tokens, self.max_batch_requests = max_batch_tokens, max_batch_requests
        self.embedder = None
        self.model = self.tokenizer = None
        self.max_length = 512
        self.normalizes = False
        self.pad_id = 0
        self.pooling = None

    def load(self):
        import fastlm
        from fastlm.models.loading import _read_config

        if self.task == "embed":
            e = self.embedder = fastlm.Embedder(self.model_dir, device=self.device, dtype=self.dtype,
                                                quantize=self.quantize, truncate=True)
            self.model, self.tokenizer, self.max_length = e.model, e.tokenizer, e.max_length
            self.normalizes = bool(e.pipeline.normalize) or any(s.kind == "Normalize" for s in e.pipeline.steps)
            self.pooling = "+".join(e.pipeline.pooling)
            self.max_length_source = e.max_length_source
        else:
            from transformers import AutoTokenizer

            self.model = fastlm.from_pretrained(self.model_dir, dtype=self.dtype, device=self.device,
                                                quantize=self.quantize)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            config = _read_config(self.model_dir)
            limit = getattr(getattr(self.model, "embeddings", None), "max_tokens", None) or getattr(
                config, "max_position_embeddings", 512)
            tmax = self.tokenizer.model_max_length
            self.max_length = min(limit, tmax) if isinstance(tmax, int) and tmax > 0 else limit
            self.max_length_source = "the model's positions"
            import inspect

            self._takes_type_ids = "token_type_ids" in inspect.signature(self.model.forward).parameters
            self.id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.vocab_size = self.model.config.vocab_size
        self._warm()

    def _warm(self):
        with torch.inference_mode():
            self._forward([[self.tokenizer.cls_token_id or 0] * 2], None)

    @property
    def dim(self) -> int:
        if self.embedder is not None:
            return self.embedder._pooled_dim
        return self.model.config.num_labels

    def submit(self, job: EncodeJob):
        if not self.healthy():
            raise EngineError(503, self.fatal or "the model is loading")
        job.left = len(job.ids)
        job.out = [None] * len(job.ids)
        self.metrics.queue_size.inc()
        self.inbox.put(job)

    def fail_all(self, e):
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _deliver(job.loop, job.fut, exc=e)

    def loop(self):
        while not self._stop.is_set():
            first = self.inbox.get()
            if first is None:
                continue
            jobs = [first]
            while True:  # everything waiting now forms this cycle's batches
                try:
                    j = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if j is not None:
                    jobs.append(j)
            self.metrics.queue_size.dec(len(jobs))
            now = time.perf_counter()
            for j in jobs:
                self.metrics.queue_time.observe(now - j.arrived)
            rows = [(j, i) for j in jobs if not j.fut.cancelled() for i in range(len(j.ids))]
            rows.sort(key=lambda r: len(r[0].ids[r[1]]))
            for batch in self._batches(rows):
                self._run(batch)

    def _batches(self, rows):
        batch, longest = [], 0
        for r in rows:
            n = len(r[0].ids[r[1]])
            if batch and (len(batch) >= self.max_batch_requests or (len(batch) + 1) * max(longest, n)
                          > self.max_batch_tokens):
                yield batch
                batch, longest = [], 0
            batch.append(r)
            longest = max(longest, n)
        if batch:
            yield batch

    def _run(self, batch):
        batch = [r for r in batch if not r[0].failed and not r[0].fut.cancelled()]
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            out = self._forward([j.ids[i] for j, i in batch],
                                [j.type_ids[i] for j, i in batch] if batch[0][0].type_ids is not None else None)
        except Exception as e:  # noqa: BLE001 - retried alone: one bad input fails its own request only
            if len(batch) == 1:
                j = batch[0][0]
                j.failed = True
                log.warning("fastlm serve: a request failed: %s: %s", type(e).__name__, e)
                _deliver(j.loop, j.fut, exc=EngineError(500, f"inference failed: {type(e).__name__}: {e}"))
                return
            for r in batch:
                self._run([r])
            return
        self.metrics.inference.labels("encode").observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(len(batch) * max(len(j.ids[i]) for j, i in batch))
        for r, (j, i) in enumerate(batch):
            j.out[i] = out[r]
            j.left -= 1
            if j.left == 0:
                _deliver(j.loop, j.fut, torch.stack(j.out))

    def _forward(self, ids: list[list[int]], type_ids: list[list[int]] | None) -> torch.Tensor:
        """Right-padded batch -> (B, d) float32 on the CPU: the pooled embedding after the checkpoint's
        modules but before any final normalisation (embed), or the head's logits (classify / rerank)."""
        from fastlm.embed import pool

        B, S = len(ids), max(len(x) for x in ids)
        x = torch.full((B, S), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, S, dtype=torch.long)
        tt = torch.zeros(B, S, dtype=torch.long) if type_ids is not None else None
        for r, row in enumerate(ids):
            x[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
            if tt is not None:
                tt[r, :len(row)] = torch.tensor(type_ids[r])
        dev = self.model.device if hasattr(self.model, "device") else torch.device("cpu")
        x, mask = x.to(dev), mask.to(dev)
        if self.embedder is None:
            kw = {}
            if tt is not None and self._takes_type_ids:
                kw["token_type_ids"] = tt.to(dev)
            return self.model(x, mask, **kw).logits.float().cpu()
        e = self.embedder
        h = e.model(x, mask).last_hidden_state
        v = pool(h, mask, e.pipeline.pooling, full_mask=mask)
        for step, module in zip(e.pipeline.steps, e._steps, strict=True):
            if module is not None:
                v = module(v)
            elif step.kind == "Normalize":
                v = torch.nn.functional.normalize(v, p=2, dim=1)
        return v.float().cpu()


# -- generation -------------------------------------------------------------------------------------
@dataclass
class GenRequest:
    """One sequence to generate. `emit(event)` is called from the engine thread with ("tok", id,
    logprob | None, top [(id, logprob)] | None), ("prompt_logprobs", [...]), ("done", reason) or
    ("error", status, message); reason is "stop", "length", "abort" or "timeout"."""

    ids: list[int]
    settings: object  # fastlm.generation.Settings
    seed: int | None
    logprobs: int | None  # top-N alternatives per token (0: only the chosen token's logprob)
    prompt_logprobs: bool
    emit: object
    deadline: float | None = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    # engine state
    pos: int = 0  # tokens in this sequence's cache rows
    last: int = 0  # the newest token (not yet in the cache)
    step: int = 0  # new tokens made so far
    state: object = None
    gen: torch.Generator | None = None
    plain: bool = False  # greedy with no logits processor: the argmax of the raw logits
    t_last: float = 0.0
    slot: int = 0  # while prefilling: the cache slot its rows are in
    plp: list = field(default_factory=list)  # prompt logprobs gathered chunk by chunk


class GenerationEngine(_Base):
    name = "generation"

    def __init__(self, model_dir: str, metrics, *, device=None, dtype=None, quantize=None, max_num_seqs: int = 32,
                 max_model_len: int | None = None, max_prefill_tokens: int = 2048):
        super().__init__(metrics, device, dtype, quantize)
        self.model_dir = model_dir
        self.slots, self.max_model_len, self.max_prefill_tokens = max_num_seqs, max_model_len, max_prefill_tokens
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.active: list[GenRequest] = []
        self.prefilling: GenRequest | None = None  # a long prompt being prefilled chunk by chunk
        self._abort = threading.Event()

    def load(self):
        from transformers import AutoTokenizer

        import fastlm
        from fastlm.cache import SlotKVCache

        self.model = fastlm.from_pretrained(self.model_dir, dtype=self.dtype, device=self.device,
                                            quantize=self.quantize)
        if type(self.model).__name__ != "GPT2LMHeadModel":
            raise ValueError(f"--task generate needs a GPT2LMHeadModel checkpoint, got {type(self.model).__name__}")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        cfg = self.model.config
        n_pos = cfg.n_positions
        cap = n_pos if self.max_model_len is None else self.max_model_len
        if not 1 <= cap <= n_pos:
            raise ValueError(f"--max-model-len must lie in [1, {n_pos}] (the model's positions), got {cap}")
        self.max_model_len = cap
        self.vocab_size = cfg.vocab_size
        self.cache = SlotKVCache(cfg.n_layer, self.slots, cfg.n_head, cfg.n_embd // cfg.n_head, cap,
                                 self.model.dtype, self.model.device)
        log.info("fastlm serve: KV cache of %d slots x %d positions (%.1f MiB)", self.slots, cap,
                 self.cache.nbytes() / 2**20)
        # decode_step runs a batch in one call on CPU for float32 / int8 panels (gpt2_decode_batch_cpu);
        # a bf16 batch runs op by op and needs the slot view
        self._batched_op = (self.model.device.type == "cpu" and self.model.dtype == torch.float32
                            and _has_op("gpt2_decode_batch_cpu"))
        # on GPU: the batched step replayed from a CUDA graph per power-of-two bucket (static_step.py)
        static, graphs = static_step.wanted(self.model.device)
        self._static = static_step.StaticSteps(self.model, self.cache, graphs) if static else None
        self._warm()

    def _warm(self):
        """A prefill and decode steps of one and of two sequences before /health says ready, so the first
        request does not pay the first calls' costs (thread pools, packed weights, allocator)."""
        dev = self.model.device
        with torch.inference_mode():
            n = min(2, self.slots)
            for b in range(n):
                self.model.prefill(torch.tensor([[0, 0]], device=dev), None, self.cache.slot(b))
            for k in range(1, n + 1):
                for _ in range(2):
                    self._step(torch.zeros(k, dtype=torch.long, device=dev),
                               torch.full((k,), 2, dtype=torch.int32, device=dev), k, 3)
            if self._static is not None:  # every bucket's graph captured before the first request
                for k in self._static.sizes:
                    self._step(torch.zeros(k, dtype=torch.long, device=dev),
                               torch.zeros(k, dtype=torch.int32, device=dev), k, 1)

    def _step(self, tokens, pos, n: int, kv_len: int):
        """model.decode_step for the sequences in slots [0, n): one sequence, or a batch where the model has
        the one-call batched CPU step, reads the whole contiguous cache (its rows [0, n)); a batch
        elsewhere (op by op) reads the strided view of the first n slots. On GPU (or with
        FASTLM_SERVE_STATIC_STEP=1) the step is static_step.StaticSteps: padded to a bucket, replayed
        from a CUDA graph."""
        if self._static is not None:
            p = self.prefilling
            return self._static(tokens, pos, n, None if p is None else (p.slot, p.pos))
        if n == 1 or self._batched_op:
            try:
                return self.model.decode_step(tokens, pos, self.cache.full(), kv_len)
            except Exception as e:  # noqa: BLE001 - this model's steps run op by op: use the view from now on
                if n == 1:
                    raise
                log.info("fastlm serve: the batched decode step on the whole cache failed (%s: %s); decoding "
                         "op by op on the view of the running slots", type(e).__name__, e)
                self._batched_op = False
        return self.model.decode_step(tokens, pos, self.cache.view(n), kv_len)

    # -- requests (called from the event loop) --
    def settings(self, prompt_len: int, **kw):
        """fastlm.generation.resolve for one request (ValueError / TypeError name a bad argument)."""
        from fastlm.generation import resolve

        return resolve(self.model, prompt_len, None, **kw)

    def submit(self, req: GenRequest):
        if not self.healthy():
            raise EngineError(503, self.fatal or "the model is loading")
        if self._abort.is_set():
            raise EngineError(503, "the server is shutting down")
        self.metrics.queue_size.inc()
        self.inbox.put(req)

    def abort_all(self):
        """Finish every request in flight with finish_reason "abort" (the end of a drain)."""
        self._abort.set()
        self.inbox.put(None)

    def in_flight(self) -> int:
        return len(self.active) + len(self.waiting) + self.inbox.qsize() + (self.prefilling is not None)

    def fail_all(self, e: EngineError):
        reqs = list(self.active) + list(self.waiting) + ([self.prefilling] if self.prefilling else [])
        self.prefilling = None
        while True:
            try:
                r = self.inbox.get_nowait()
            except queue.Empty:
                break
            if r is not None:
                reqs.append(r)
        self.active, self.waiting = [], collections.deque()
        for r in reqs:
            r.emit(("error", e.status, e.message))

    # -- the loop (engine thread) --
    def loop(self):
        while not self._stop.is_set():
            self._drain_inbox(block=not self.active and not self.waiting and self.prefilling is None)
            if self._abort.is_set():
                for r in list(self.active) + list(self.waiting) + ([self.prefilling] if self.prefilling else []):
                    r.emit(("done", "abort"))
                self.active, self.waiting, self.prefilling = [], collections.deque(), None
                self.metrics.running.set(0)
                continue
            self._reap()
            self._admit()
            if self.active:
                self._decode()
            self.metrics.running.set(len(self.active))

    def _drain_inbox(self, block: bool):
        try:
            r = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if r is not None:
                self.metrics.queue_size.dec()
                self.waiting.append(r)
            try:
                r = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _expired(self, r: GenRequest, now: float) -> str | None:
        if r.cancelled:
            return "cancelled"
        if r.deadline is not None and now > r.deadline:
            return "timeout"
        return None

    def _reap(self):
        now = time.perf_counter()
        for r in [r for r in self.waiting if self._expired(r, now)]:
            self.waiting.remove(r)
            r.emit(("done", "timeout" if self._expired(r, now) == "timeout" else "abort"))
        gone = [i for i, r in enumerate(self.active) if self._expired(self.active[i], now)]
        for i in gone:
            r = self.active[i]
            r.emit(("done", "timeout" if self._expired(r, now) == "timeout" else "abort"))
        self._remove(gone)

    def _remove(self, idx: list[int]):
        """Drop active sequences idx; the last slots move into the holes (rows [0, pos))."""
        for i in sorted(idx, reverse=True):
            last = len(self.active) - 1
            if i != last:
                self.cache.move(last, i, self.active[last].pos)
                self.active[i] = self.active[last]
            self.active.pop()

    def _admit(self):
        """Between two decode steps: prompt tokens up to --max-prefill-tokens. A prompt longer than
        that is prefilled in chunks over several steps (chunked prefill) in the slot after the
        running ones, and nothing else joins until it is done."""
        budget = self.max_prefill_tokens
        if self.prefilling is not None:
            budget -= self._prefill_more(self.prefilling, budget)
        while (self.prefilling is None and self.waiting and len(self.active) < self.slots
               and (budget > 0 or not self.active)):
            r = self.waiting.popleft()
            if r.cancelled:
                r.emit(("done", "abort"))
                continue
            self.metrics.queue_time.observe(time.perf_counter() - r.arrived)
            try:
                self._start(r)
            except Exception as e:  # noqa: BLE001 - this request fails alone
                self._fail_prefill(r, e)
                continue
            budget -= self._prefill_more(r, max(budget, 1))

    def _start(self, r: GenRequest):
        from fastlm.generation import State

        s = r.settings
        ids = torch.tensor([r.ids], dtype=torch.long, device=self.model.device)
        r.state = State(s, ids, torch.ones_like(ids, dtype=torch.bool), self.vocab_size)
        if r.seed is not None:
            r.gen = torch.Generator(device=self.model.device).manual_seed(int(r.seed))
        r.plain = _plain(s, r.state)
        r.slot, r.pos, r.plp = len(self.active), 0, []
        self.prefilling = r

    def _fail_prefill(self, r: GenRequest, e: BaseException):
        log.warning("fastlm serve: a request failed in prefill: %s: %s", type(e).__name__, e)
        if self.prefilling is r:
            self.prefilling = None
        r.emit(("error", 500, f"generation failed: {type(e).__name__}: {e}"))

    def _prefill_more(self, r: GenRequest, budget: int) -> int:
        """Prefills up to `budget` more prompt tokens of r (its next chunk); when the prompt is all in
        the cache, samples its first token and r joins the running batch. Returns the tokens done."""
        if r.cancelled:
            self.prefilling = None
            r.emit(("done", "abort"))
            return 0
        if r.deadline is not None and time.perf_counter() > r.deadline:
            self.prefilling = None
            r.emit(("done", "timeout"))
            return 0
        try:
            if r.slot != len(self.active):  # running ones left meanwhile: the rows follow the packed slots
                self.cache.move(r.slot, len(self.active), r.pos)
                r.slot = len(self.active)
            t0 = time.perf_counter()
            T = len(r.ids)
            n = min(T - r.pos, max(1, budget))
            ids = torch.tensor([r.ids[r.pos:r.pos + n]], dtype=torch.long, device=self.model.device)
            # (n, V) where prompt logprobs need every position, else (1, V): the last one samples
            logits = self.model.prefill_chunk(ids, r.pos, self.cache.slot(r.slot), last_only=not r.prompt_logprobs)[0]
            if r.prompt_logprobs:
                nxt = torch.tensor(r.ids[r.pos + 1:r.pos + n + 1], dtype=torch.long, device=logits.device)
                lp = torch.log_softmax(logits[:len(nxt)].float(), -1)
                got = lp.gather(1, nxt[:, None])[:, 0].tolist()
                r.plp += list(zip(got, _top(lp, r.logprobs or 0), strict=True))
            r.pos += n
            self.metrics.inference.labels("prefill").observe(time.perf_counter() - t0)
            self.metrics.prompt_tokens.inc(n)
            if r.pos < T:
                return n
            self.prefilling = None
            if r.prompt_logprobs:
                r.emit(("prompt_logprobs", [(None, None)] + r.plp))
            self.active.append(r)
            tok = self._pick(r, logits[-1], None)
        except Exception as e:  # noqa: BLE001 - this request fails alone
            if self.active and self.active[-1] is r:
                self.active.pop()
            self._fail_prefill(r, e)
            return 0
        if self._after(r, tok):
            self._remove([len(self.active) - 1])
        return n

    def _pick(self, r: GenRequest, logits: torch.Tensor, argmax: int | None) -> int:
        """The next token of r from its raw logits (V,), with its processors and generator."""
        from fastlm.generation import choose, process

        s, st = r.settings, r.state
        if r.plain:
            tok = argmax if argmax is not None else int(logits.argmax())
        else:
            scores = process(logits[None].float(), s, r.step, st)
            tok = int(choose(scores, s.do_sample, r.gen)[0])
        lp = top = None
        if r.logprobs is not None:
            logp = torch.log_softmax(logits.float(), -1)
            lp = float(logp[tok])
            top = _top(logp[None], r.logprobs)[0]
        if st.seen is not None:
            st.seen[0, tok] = True
        if st.hist is not None:
            st.hist[0, s.prompt_len + r.step] = tok
        now = time.perf_counter()
        if r.step == 0:
            self.metrics.ttft.observe(now - r.arrived)
        else:
            self.metrics.itl.observe(now - r.t_last)
        r.t_last = now
        r.step += 1
        r.last = tok
        r.emit(("tok", tok, lp, top))
        self.metrics.generation_tokens.inc()
        return tok

    def _after(self, r: GenRequest, tok: int) -> bool:
        """Whether r has finished after token `tok` (and say so)."""
        s = r.settings
        if tok in s.eos_token_id:
            r.emit(("done", "stop"))
            return True
        if r.step >= s.max_new_tokens or r.pos + 1 > self.max_model_len:
            r.emit(("done", "length"))
            return True
        return False

    def _decode(self):
        n = len(self.active)
        dev = self.model.device
        tokens = torch.tensor([r.last for r in self.active], dtype=torch.long, device=dev)
        pos = torch.tensor([r.pos for r in self.active], dtype=torch.int32, device=dev)
        t0 = time.perf_counter()
        try:
            logits = self._step(tokens, pos, n, int(pos.max()) + 1)  # (n, V)
            rows = [logits[i] for i in range(n)]
        except Exception as e:  # noqa: BLE001 - rerun one sequence at a time: only the faulty ones fail
            log.warning("fastlm serve: a batched decode step failed (%s: %s); retrying one by one",
                        type(e).__name__, e)
            from fastlm import backend

            rows = []
            for i, r in enumerate(self.active):
                try:  # the reference path: it reads a strided one-slot view
                    with backend.use_backend("torch"):
                        rows.append(self.model.decode_step(tokens[i:i + 1], pos[i:i + 1], self.cache.slot(i),
                                                           r.pos + 1)[0])
                except Exception as e1:  # noqa: BLE001
                    rows.append(e1)
        self.metrics.inference.labels("decode").observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(n)
        self.metrics.batch_tokens.observe(n)
        plain = [i for i, r in enumerate(self.active) if r.plain and not isinstance(rows[i], Exception)]
        argmax = {}
        if plain:
            am = torch.stack([rows[i] for i in plain]).argmax(-1).tolist()
            argmax = dict(zip(plain, am, strict=True))
        done = []
        for i, r in enumerate(self.active):
            if isinstance(rows[i], Exception):
                r.emit(("error", 500, f"generation failed: {type(rows[i]).__name__}: {rows[i]}"))
                done.append(i)
                continue
            r.pos += 1
            try:
                tok = self._pick(r, rows[i], argmax.get(i))
            except Exception as e:  # noqa: BLE001
                r.emit(("error", 500, f"generation failed: {type(e).__name__}: {e}"))
                done.append(i)
                continue
            if self._after(r, tok):
                done.append(i)
        self._remove(done)


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.fastlm, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _top(logp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row of logp (N, V): the k most likely (id, logprob), best first."""
    if k <= 0:
        return [[] for _ in range(logp.shape[0])]
    v, i = torch.topk(logp, k, dim=-1)
    return [list(zip(ii, vv, strict=True)) for ii, vv in zip(i.tolist(), v.tolist(), strict=True)]


def _plain(s, st) -> bool:
    """Greedy with no logits processor that could change the argmax (fastlm.generation.process)."""
    return (not s.do_sample and st.seen is None and st.prompt_ids is None and st.hist is None
            and (st.eos is None or s.min_new_tokens == 0) and s.forced_bos_token_id is None and st.forced_eos is None
            and not s.remove_invalid_values and s.exponential_decay_length_penalty is None and st.suppress is None
            and st.begin_suppress is None and st.sequence_bias is None and st.bad_words is None
            and not s.renormalize_logits and s.no_repeat_ngram_size == 0)
