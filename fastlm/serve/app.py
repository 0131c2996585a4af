"""The FastAPI app of `fastlm serve`, its routes, limits and graceful shutdown (see docs/serve.md)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fastlm.serve import errors
from fastlm.serve.engine import (
    EncodeJob,
    EncoderEngine,
    EngineError,
    GenerationEngine,
    GenRequest,
    Tokenizers,
    detect_task,
)
from fastlm.serve.errors import APIError
from fastlm.serve.metrics import Metrics
from fastlm.serve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbedRequest,
    ModelCard,
    ModelList,
    PredictRequest,
    RerankRequest,
    TokenizeRequest,
    Usage,
)

log = logging.getLogger("fastlm.serve")
ROUTES_FOR = {"embed": {"/v1/embeddings", "/embed"}, "classify": {"/predict"}, "rerank": {"/rerank", "/predict"},
              "generate": {"/v1/completions"}}
MODEL_ROUTES = {"/v1/embeddings", "/v1/completions", "/embed", "/predict", "/rerank", "/tokenize"}


@dataclass
class ServeConfig:
    """Every `fastlm serve` flag (docs/serve.md)."""

    model: str
    task: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    max_concurrent_requests: int = 512
    max_batch_tokens: int = 16384
    max_batch_requests: int = 64
    max_client_batch_size: int = 32
    max_num_seqs: int = 32
    max_model_len: int | None = None
    max_prefill_tokens: int = 2048
    payload_limit: int = 2_000_000
    tokenization_workers: int = 2
    request_timeout: float | None = None
    shutdown_timeout: float = 30.0
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    log_level: str = "info"


class State:
    """What the routes share: the config, the engine, the tokenizer pool, metrics, the drain flag."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.task = cfg.task or detect_task(cfg.model)
        self.name = cfg.served_model_name or cfg.model
        self.created = int(time.time())
        self.metrics = Metrics()
        self.tok = Tokenizers(cfg.tokenization_workers)
        self.in_flight = 0
        self.draining = False
        if self.task == "generate":
            self.engine = GenerationEngine(cfg.model, self.metrics, device=cfg.device, dtype=cfg.dtype,
                                           quantize=cfg.quantize, max_num_seqs=cfg.max_num_seqs,
                                           max_model_len=cfg.max_model_len,
                                           max_prefill_tokens=cfg.max_prefill_tokens)
        else:
            self.engine = EncoderEngine(cfg.model, self.task, self.metrics, device=cfg.device, dtype=cfg.dtype,
                                        quantize=cfg.quantize, max_batch_tokens=cfg.max_batch_tokens,
                                        max_batch_requests=cfg.max_batch_requests)

    def check_ready(self):
        if self.engine.fatal is not None:
            raise APIError(503, f"the server is unhealthy: {self.engine.fatal}")
        if not self.engine.ready:
            raise APIError(503, "the model is loading; retry when /health answers 200",
                           headers={"Retry-After": "1"})

    def timeout(self) -> float | None:
        return self.cfg.request_timeout


# -- the middleware: auth, payload limit, bounded concurrency, drain, metrics ------------------------
class Gate:
    """Pure ASGI middleware (streaming responses pass through untouched). In order: 503 while
    draining (SIGTERM), 401 without the API key (every route but /health), 413 for a body over the
    payload limit (Content-Length), 429 with Retry-After when max_concurrent_requests are in flight
    (model routes); counts requests, successes and failures by reason."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, path = self.state, scope["path"]
        m = st.metrics
        route = path if path in MODEL_ROUTES or path.startswith("/v1/") else "other"
        m.requests.labels(route).inc()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def refuse(status, msg, reason, extra=None):
            m.failure.labels(route, reason).inc()
            resp = errors.error_response(path, status, msg, headers=extra)
            await resp(scope, receive, send)

        if st.draining and path != "/metrics":
            return await refuse(503, "the server is shutting down", "unavailable")
        key = st.cfg.api_key
        if key is not None and path != "/health" and scope.get("method") != "OPTIONS":
            auth = headers.get("authorization", "")
            if auth != f"Bearer {key}":
                return await refuse(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                    "unauthorized")
        cl = headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > st.cfg.payload_limit:
            return await refuse(413, f"the request body has {cl} bytes, more than the server's --payload-limit "
                                f"of {st.cfg.payload_limit}", "too_large")
        counted = path in MODEL_ROUTES
        if counted:
            if st.in_flight >= st.cfg.max_concurrent_requests:
                return await refuse(429, f"the server has {st.in_flight} requests in flight "
                                    f"(--max-concurrent-requests {st.cfg.max_concurrent_requests}); retry later",
                                    "overloaded", {"Retry-After": "1"})
            st.in_flight += 1
            m.in_flight.inc()
        status = [500]
        t0 = time.perf_counter()

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        finally:
            if counted:
                st.in_flight -= 1
                m.in_flight.dec()
                m.e2e.labels(route).observe(time.perf_counter() - t0)
            s = status[0]
            if s < 400:
                m.success.labels(route).inc()
            else:
                reason = {400: "validation", 401: "unauthorized", 404: "validation", 408: "timeout",
                          413: "too_large", 422: "validation", 429: "overloaded", 503: "unavailable"}.get(s, "backend")
                m.failure.labels(route, reason).inc()


def build_app(cfg: ServeConfig, state: State | None = None) -> FastAPI:
    st = state or State(cfg)
    app = FastAPI(title="fastlm serve", version=_version())
    app.state.fastlm = st
    errors.install(app)

    def ensure(route: str):
        st.check_ready()
        if route not in ROUTES_FOR[st.task]:
            raise APIError(404, f"{route} is not served for this model: it serves the task {st.task!r} "
                           f"(routes {', '.join(sorted(ROUTES_FOR[st.task]))})", code="unsupported_task")

    def check_model(name: str | None):
        if name is not None and name not in (st.name, "", os.path.basename(os.path.normpath(st.cfg.model))):
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    # -- health, info, models, metrics --
    @app.get("/health")
    async def health():
        if st.engine.fatal is not None:
            return errors.error_response("/health", 503, st.engine.fatal)
        if not st.engine.ready:
            return errors.error_response("/health", 503, "the model is loading")
        return Response(status_code=200)

    @app.get("/info")
    async def info():
        e = st.engine
        return {"model_id": st.name, "model_path": st.cfg.model, "model_sha": None, "task": st.task,
                "model_dtype": str(getattr(getattr(e, "model", None), "dtype", st.cfg.dtype)).replace("torch.", ""),
                "model_type": _model_type(st), "quantize": st.cfg.quantize,
                "device": str(getattr(getattr(e, "model", None), "device", st.cfg.device)),
                "max_concurrent_requests": st.cfg.max_concurrent_requests,
                "max_input_length": _max_input(st), "max_batch_tokens": st.cfg.max_batch_tokens,
                "max_batch_requests": st.cfg.max_batch_requests, "max_client_batch_size": st.cfg.max_client_batch_size,
                "max_num_seqs": st.cfg.max_num_seqs if st.task == "generate" else None,
                "payload_limit": st.cfg.payload_limit, "tokenization_workers": st.cfg.tokenization_workers,
                "request_timeout": st.cfg.request_timeout, "version": _version(), "ready": e.ready}

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=st.name, created=st.created, root=st.cfg.model,
                                         max_model_len=_max_input(st))])

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- tokenization helpers (run in the pool) --
    async def encode_texts(texts, *, truncate: bool, left: bool, openai: bool, pairs=None):
        """Token ids (and type ids for pairs) of each text, checked against the model's limit."""
        e = st.engine
        tok = e.tokenizer
        limit = e.max_length

        def work():
            side = tok.truncation_side
            try:
                tok.truncation_side = "left" if left else "right"
                if pairs is not None:
                    enc = tok([a for a, _ in pairs], [b for _, b in pairs], truncation="only_second" if truncate
                              else False, max_length=limit if truncate else None, return_token_type_ids=True)
                    return enc["input_ids"], enc.get("token_type_ids")
                enc = tok(list(texts), truncation=truncate, max_length=limit if truncate else None)
                return enc["input_ids"], None
            finally:
                tok.truncation_side = side

        t0 = time.perf_counter()
        ids, tt = await st.tok.run(work)
        st.metrics.tokenize.observe(time.perf_counter() - t0)
        for i, x in enumerate(ids):
            if len(x) > limit:
                raise APIError(400 if openai else 422,
                               f"input {i} has {len(x)} tokens, more than the model's maximum input length of "
                               f"{limit} tokens; shorten it or ask for truncation ("
                               + ("truncate_prompt_tokens" if openai else "\"truncate\": true") + ")",
                               param="input" if openai else None, code="context_length_exceeded" if openai else None)
            if not x:
                raise APIError(400, f"input {i} has no token", param="input" if openai else None,
                               error_type=None if openai else "Empty")
        return ids, tt

    def check_ids(rows, openai: bool, what: str):
        vocab = st.engine.vocab_size
        for i, row in enumerate(rows):
            if not row:
                raise APIError(400, f"{what} {i} is empty", param=what if openai else None,
                               error_type=None if openai else "Empty")
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"{what} {i} holds unknown token id {bad[0]} (the vocabulary has {vocab} ids, "
                               f"0..{vocab - 1})", param=what if openai else None)

    def inputs_of(raw, openai: bool, what: str):
        """str | [str] | [int] | [[int]] -> (texts or None, token id rows or None), checked: empty
        input 400, too many inputs 413."""
        if isinstance(raw, str):
            items = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            items = [raw]
        else:
            items = list(raw)
        if not items:
            raise APIError(400, f"{what} is empty", param=what if openai else None,
                           error_type=None if openai else "Empty")
        limit = st.cfg.max_client_batch_size
        if len(items) > limit:
            raise APIError(413, f"{what} holds {len(items)} inputs, more than the server's --max-client-batch-size "
                           f"of {limit}", param=what if openai else None)
        if all(isinstance(x, str) for x in items):
            for i, x in enumerate(items):
                if not x:
                    raise APIError(400, f"{what} {i} is an empty string", param=what if openai else None,
                                   error_type=None if openai else "Empty")
            return items, None
        if all(isinstance(x, list) for x in items):
            check_ids(items, openai, what)
            return None, items
        raise APIError(400 if openai else 422, f"{what} must be a string, a list of strings, a list of token ids "
                       "or a list of lists of token ids, not a mix", param=what if openai else None)

    async def wait(request: Request, fut: asyncio.Future):
        """The engine's result, or: the client left (the engine drops the work), the timeout (408)."""
        disc = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({fut, disc}, timeout=st.timeout(), return_when=asyncio.FIRST_COMPLETED)
            if fut in done:
                try:
                    return fut.result()
                except EngineError as e:
                    raise APIError(e.status, e.message) from None
            fut.cancel()
            if disc in done:
                raise APIError(499, "the client disconnected")
            raise APIError(408, f"the request took longer than --request-timeout ({st.timeout()} s)")
        finally:
            disc.cancel()

    async def encode(request: Request, texts, ids, *, truncate: bool, left: bool, openai: bool, pairs=None):
        tt = None
        if ids is None:
            ids, tt = await encode_texts(texts, truncate=truncate, left=left, openai=openai, pairs=pairs)
        else:
            limit = st.engine.max_length
            for i, row in enumerate(ids):
                if len(row) > limit:
                    if not truncate:
                        raise APIError(400 if openai else 422, f"input {i} has {len(row)} tokens, more than the "
                                       f"model's maximum input length of {limit} tokens",
                                       param="input" if openai else None,
                                       code="context_length_exceeded" if openai else None)
                    ids[i] = row[-limit:] if left else row[:limit]
        loop = asyncio.get_running_loop()
        job = EncodeJob(ids=ids, type_ids=tt, loop=loop, fut=loop.create_future())
        try:
            st.engine.submit(job)
        except EngineError as e:
            raise APIError(e.status, e.message) from None
        return await wait(request, job.fut), sum(len(x) for x in ids)

    def finish_embedding(v: torch.Tensor, normalize: bool, dims: int | None, openai: bool) -> torch.Tensor:
        if dims is not None:
            if dims > v.shape[1]:
                raise APIError(400, f"dimensions must be at most the model's {v.shape[1]}, got {dims}",
                               param="dimensions" if openai else None)
            v = v[:, :dims]
        if normalize:
            v = torch.nn.functional.normalize(v, p=2, dim=1)
        return v

    # -- OpenAI: embeddings --
    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(body: EmbeddingRequest, request: Request):
        ensure("/v1/embeddings")
        check_model(body.model)
        texts, ids = inputs_of(body.input, True, "input")
        trunc = body.truncate_prompt_tokens is not None
        v, n_tok = await encode(request, texts, ids, truncate=trunc, left=False, openai=True)
        v = finish_embedding(v, st.engine.normalizes, body.dimensions, True)
        data = []
        for i, row in enumerate(v):
            if body.encoding_format == "base64":
                emb = base64.b64encode(row.numpy().astype("<f4").tobytes()).decode()
            else:
                emb = row.tolist()
            data.append(EmbeddingData(embedding=emb, index=i))
        return EmbeddingResponse(data=data, model=st.name, usage=Usage(prompt_tokens=n_tok, total_tokens=n_tok))

    # -- TEI: embed, predict, rerank, tokenize --
    @app.post("/embed")
    async def embed(body: EmbedRequest, request: Request):
        ensure("/embed")
        texts, ids = inputs_of(body.inputs, False, "inputs")
        v, _ = await encode(request, texts, ids, truncate=bool(body.truncate),
                            left=body.truncation_direction.lower() == "left", openai=False)
        v = finish_embedding(v, body.normalize, body.dimensions, False)
        return JSONResponse(v.tolist())

    def labels(logits: torch.Tensor, raw: bool):
        e = st.engine
        if raw:
            scores = logits
        elif logits.shape[-1] == 1:
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, -1)
        out = []
        for row in scores.tolist():
            preds = [{"score": s, "label": e.id2label.get(j, f"LABEL_{j}")} for j, s in enumerate(row)]
            out.append(sorted(preds, key=lambda p: -p["score"]))
        return out

    @app.post("/predict")
    async def predict(body: PredictRequest, request: Request):
        ensure("/predict")
        raw = body.inputs
        single = isinstance(raw, str)
        items = [raw] if isinstance(raw, str) else list(raw)
        if not items:
            raise APIError(400, "inputs is empty", error_type="Empty")
        if len(items) > st.cfg.max_client_batch_size:
            raise APIError(413, f"inputs holds {len(items)} inputs, more than the server's --max-client-batch-size "
                           f"of {st.cfg.max_client_batch_size}")
        pairs = None
        if all(isinstance(x, list) for x in items):
            if not all(len(x) == 2 and all(isinstance(t, str) for t in x) for x in items):
                raise APIError(422, "inputs: a pair must be a list of two strings")
            pairs = [tuple(x) for x in items]
        elif not all(isinstance(x, str) for x in items):
            raise APIError(422, "inputs must be a string, a list of strings or a list of string pairs, not a mix")
        if pairs is None and any(not x for x in items):
            raise APIError(400, "inputs holds an empty string", error_type="Empty")
        logits, _ = await encode(request, items if pairs is None else None, None, truncate=bool(body.truncate),
                                 left=body.truncation_direction.lower() == "left", openai=False, pairs=pairs)
        out = labels(logits, body.raw_scores)
        return JSONResponse(out[0] if single else out)

    @app.post("/rerank")
    async def rerank(body: RerankRequest, request: Request):
        ensure("/rerank")
        if not body.query or not body.texts:
            raise APIError(400, "query and texts must not be empty", error_type="Empty")
        if len(body.texts) > st.cfg.max_client_batch_size:
            raise APIError(413, f"texts holds {len(body.texts)} texts, more than the server's "
                           f"--max-client-batch-size of {st.cfg.max_client_batch_size}")
        pairs = [(body.query, t) for t in body.texts]
        logits, _ = await encode(request, None, None, truncate=bool(body.truncate),
                                 left=body.truncation_direction.lower() == "left", openai=False, pairs=pairs)
        s = logits[:, 0] if body.raw_scores else torch.sigmoid(logits[:, 0])
        ranks = [{"index": i, "score": float(x), **({"text": body.texts[i]} if body.return_text else {})}
                 for i, x in enumerate(s.tolist())]
        return JSONResponse(sorted(ranks, key=lambda r: -r["score"]))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        st.check_ready()
        tok = st.engine.tokenizer
        items = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if not items:
            raise APIError(400, "inputs is empty", error_type="Empty")
        if len(items) > st.cfg.max_client_batch_size:
            raise APIError(413, f"inputs holds {len(items)} inputs, more than the server's --max-client-batch-size "
                           f"of {st.cfg.max_client_batch_size}")

        def work():
            enc = tok(items, add_special_tokens=body.add_special_tokens, return_offsets_mapping=True)
            special = set(tok.all_special_ids)
            out = []
            for text, ids, offs in zip(items, enc["input_ids"], enc["offset_mapping"], strict=True):
                row = []
                for t, (a, b) in zip(ids, offs, strict=True):
                    sp = t in special
                    row.append({"id": t, "text": tok.convert_ids_to_tokens(t) if sp else text[a:b], "special": sp,
                                "start": None if sp else a, "stop": None if sp else b})
                out.append(row)
            return out

        return JSONResponse(await st.tok.run(work))

    # -- OpenAI: completions --
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        ensure("/v1/completions")
        check_model(body.model)
        e: GenerationEngine = st.engine
        for f in ("presence_penalty", "frequency_penalty"):
            if getattr(body, f):
                raise APIError(400, f"{f} is not supported by fastlm serve (use repetition_penalty)", param=f)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by fastlm serve", param="logit_bias")
        if body.suffix:
            raise APIError(400, "suffix is not supported by fastlm serve", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported by fastlm serve", param="best_of")
        texts, ids = inputs_of(body.prompt, True, "prompt")
        if ids is None:
            t0 = time.perf_counter()
            ids = await st.tok.run(lambda: e.tokenizer(texts)["input_ids"])
            st.metrics.tokenize.observe(time.perf_counter() - t0)
            for i, row in enumerate(ids):
                if not row:
                    raise APIError(400, f"prompt {i} has no token", param="prompt")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        cap = e.max_model_len
        sampling = (body.temperature if body.temperature is not None else 1.0) > 0
        plans = []
        for row in ids:
            max_tokens = body.max_tokens if body.max_tokens is not None else cap - len(row)
            if len(row) + max_tokens > cap:
                raise APIError(400, f"This model's maximum context length is {cap} tokens. However, you requested "
                               f"{len(row) + max_tokens} tokens ({len(row)} in the prompt, {max_tokens} in the "
                               "completion). Please reduce the length of the prompt or completion.",
                               param="prompt" if len(row) >= cap else "max_tokens", code="context_length_exceeded")
            kw = dict(max_new_tokens=max_tokens, do_sample=sampling, min_new_tokens=body.min_tokens,
                      repetition_penalty=body.repetition_penalty)
            if body.ignore_eos:
                kw["eos_token_id"] = []
            if sampling:
                kw.update(temperature=body.temperature, top_p=body.top_p if body.top_p is not None else 1.0,
                          top_k=body.top_k if body.top_k and body.top_k > 0 else 0)
            try:
                settings = e.settings(len(row), **kw)
            except (ValueError, TypeError) as err:
                raise APIError(400, str(err)) from None
            plans.append((row, settings))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        runs = []
        for p, (row, settings) in enumerate(plans):
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                runs.append(_Choice(st, p * body.n + j, row, settings, seed, body, stops))
        for r in runs:
            r.start()
        if body.stream:
            return StreamingResponse(_stream(st, request, runs, rid, created, body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            results = await _gather_or_disconnect(request, runs)
        finally:
            for r in runs:
                r.cancel()
        choices, n_prompt, n_out = [], 0, 0
        seen_prompts = set()
        for r in results:
            choices.append(CompletionChoice(index=r.index, text=r.text, logprobs=r.logprobs_obj(),
                                            finish_reason=r.finish, stop_reason=r.stop_reason))
            if id(r.prompt) not in seen_prompts:
                seen_prompts.add(id(r.prompt))
                n_prompt += len(r.prompt)
            n_out += r.n_out
        return CompletionResponse(id=rid, created=created, model=st.name, choices=choices,
                                  usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_out,
                                              total_tokens=n_prompt + n_out))

    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (after the body was read, receive() waits for that)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


class _Choice:
    """One choice of a completion: its engine request, and the text, logprobs and finish reason made
    from its tokens (detokenized in the pool; stop strings found here, which then cancel the request)."""

    def __init__(self, st: State, index: int, prompt: list[int], settings, seed, body: CompletionRequest, stops):
        self.st, self.index, self.prompt, self.body, self.stops = st, index, prompt, body, stops
        self.q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        timeout = st.timeout()
        self.req = GenRequest(ids=prompt, settings=settings, seed=seed, logprobs=body.logprobs,
                              prompt_logprobs=bool(body.echo and body.logprobs is not None),
                              emit=lambda ev: _put(loop, self.q, ev),
                              deadline=None if timeout is None else time.perf_counter() + timeout)
        self.ids: list[int] = []
        self.lps: list = []
        self.prompt_lps = None
        self.text = ""
        self.sent = 0
        self.finish = None
        self.stop_reason = None
        self.error: APIError | None = None
        self.echo_text = None

    @property
    def n_out(self) -> int:
        return len(self.ids)

    def start(self):
        try:
            self.st.engine.submit(self.req)
        except EngineError as e:
            raise APIError(e.status, e.message) from None

    def cancel(self):
        self.req.cancelled = True

    async def _decode(self, ids):
        tok = self.st.engine.tokenizer
        return await self.st.tok.run(lambda: tok.decode(ids, skip_special_tokens=True))

    async def next_piece(self) -> tuple[str, list, bool]:
        """Waits for tokens; returns (new text, new logprob entries, finished)."""
        evs = [await self.q.get()]
        while not self.q.empty():
            evs.append(self.q.get_nowait())
        n0 = len(self.ids)
        for ev in evs:
            if ev[0] == "tok":
                self.ids.append(ev[1])
                self.lps.append((ev[1], ev[2], ev[3]))
            elif ev[0] == "prompt_logprobs":
                self.prompt_lps = ev[1]
            elif ev[0] == "done":
                if self.finish is None:
                    self.finish = {"stop": "stop", "length": "length"}.get(ev[1], "abort")
                    if ev[1] == "timeout":
                        self.error = APIError(408, "the request took longer than --request-timeout "
                                              f"({self.st.timeout()} s)")
            elif ev[0] == "error":
                self.finish = "abort"
                self.error = APIError(ev[1], ev[2])
        text = await self._decode(self.ids) if len(self.ids) != n0 or self.finish else self.text
        if self.stops:
            start = max(0, self.sent - max(len(s) for s in self.stops))
            hits = [(text.find(s, start), s) for s in self.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                text = text[:i]
                self.finish, self.stop_reason = "stop", s
                self.req.cancelled = True
        self.text = text
        upto = len(text)
        if not self.finish:
            if self.stops:
                upto -= max(len(s) for s in self.stops) - 1
            while upto > self.sent and text[upto - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                upto -= 1
        upto = max(upto, self.sent)
        piece = text[self.sent:upto]
        self.sent = upto
        new_lps = self.lps[n0:] if self.body.logprobs is not None else []
        return piece, new_lps, self.finish is not None

    async def echo(self) -> str:
        if self.echo_text is None:
            self.echo_text = await self._decode(self.prompt) if self.body.echo else ""
        return self.echo_text

    def logprobs_entries(self, entries, offset0: int):
        """CompletionLogprobs for (id, logprob, top) entries, text offsets from offset0."""
        tok = self.st.engine.tokenizer
        out = CompletionLogprobs()
        off = offset0
        for tid, lp, top in entries:
            s = tok.decode([tid])
            out.tokens.append(s)
            out.token_logprobs.append(lp)
            out.top_logprobs.append(None if top is None else {tok.decode([i]): v for i, v in top})
            out.text_offset.append(off)
            off += len(s)
        return out

    def logprobs_obj(self):
        if self.body.logprobs is None:
            return None
        entries = list(self.lps)
        if self.prompt_lps is not None:
            pre = [(t, lp, top) for t, (lp, top) in zip(self.prompt, self.prompt_lps, strict=True)]
            entries = pre + entries
        return self.logprobs_entries(entries, 0)

    async def run(self):
        """Until finished (non-streaming). Raises the request's APIError if it failed."""
        echo = await self.echo()
        while True:
            _, _, fin = await self.next_piece()
            if fin:
                break
        if self.error is not None:
            raise self.error
        self.text = echo + self.text
        return self


def _put(loop, q: asyncio.Queue, ev):
    try:
        loop.call_soon_threadsafe(q.put_nowait, ev)
    except RuntimeError:
        pass


async def _gather_or_disconnect(request: Request, runs: list[_Choice]):
    tasks = [asyncio.ensure_future(r.run()) for r in runs]
    disc = asyncio.ensure_future(_disconnected(request))
    try:
        gathered = asyncio.ensure_future(asyncio.gather(*tasks))
        done, _ = await asyncio.wait({gathered, disc}, return_when=asyncio.FIRST_COMPLETED)
        if gathered in done:
            return gathered.result()
        gathered.cancel()
        raise APIError(499, "the client disconnected")
    finally:
        disc.cancel()
        for t in tasks:
            t.cancel()


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream(st: State, request: Request, runs: list[_Choice], rid: str, created: int, body: CompletionRequest):
    """SSE chunks: one choice per chunk as its text comes, a final chunk per choice with its
    finish_reason, a usage chunk (choices []) when stream_options.include_usage, then [DONE]. The
    client leaving (the generator is closed) cancels every choice; the engine frees their slots
    at its next step."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(r: _Choice, text: str, finish, lps):
        c = {"index": r.index, "text": text, "logprobs": lps, "finish_reason": finish}
        if finish is not None:
            c["stop_reason"] = r.stop_reason
        d = {"id": rid, "object": "text_completion", "created": created, "model": st.name, "choices": [c]}
        if include_usage:
            d["usage"] = None
        return d

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(r: _Choice):
        try:
            echo = await r.echo()
            first = True
            while True:
                piece, lps, fin = await r.next_piece()
                lp_obj = None
                if body.logprobs is not None:
                    entries = lps
                    if first and r.prompt_lps is not None:
                        entries = [(t, lp, top) for t, (lp, top) in zip(r.prompt, r.prompt_lps, strict=True)] + lps
                    lp_obj = r.logprobs_entries(entries, 0).model_dump()
                text = (echo if first else "") + piece
                first = False
                if fin:
                    if text or lp_obj:
                        await merged.put(chunk(r, text, None, lp_obj))
                    await merged.put(chunk(r, "", r.finish, None))
                    break
                if text or lp_obj:
                    await merged.put(chunk(r, text, None, lp_obj))
        except Exception as e:  # noqa: BLE001 - this choice ends with abort; the others go on
            log.warning("fastlm serve: a streamed choice failed: %s", e)
            await merged.put(chunk(r, "", "abort", None))
        finally:
            await merged.put(None)

    tasks = [asyncio.ensure_future(pump(r)) for r in runs]
    try:
        left = len(runs)
        while left:
            item = await merged.get()
            if item is None:
                left -= 1
                continue
            yield _sse(item)
        if include_usage:
            n_prompt = sum(len(p) for p in {id(r.prompt): r.prompt for r in runs}.values())
            n_out = sum(r.n_out for r in runs)
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": st.name, "choices": [],
                        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                  "total_tokens": n_prompt + n_out}})
        yield b"data: [DONE]\n\n"
    finally:
        for r in runs:
            r.cancel()
        for t in tasks:
            t.cancel()


def _model_type(st: State):
    e = st.engine
    if st.task == "embed":
        return {"embedding": {"pooling": getattr(e, "pooling", None)}}
    if st.task in ("classify", "rerank"):
        labels = getattr(e, "id2label", {}) or {}
        return {"reranker" if st.task == "rerank" else "classifier":
                {"id2label": {str(k): v for k, v in labels.items()}, "label2id": {v: k for k, v in labels.items()}}}
    return {"generation": {}}


def _max_input(st: State):
    e = st.engine
    if not e.ready:
        return None
    return e.max_model_len if st.task == "generate" else e.max_length


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fastlm")
    except Exception:  # noqa: BLE001 - run from a source tree
        return "0.1.0"


# -- running ----------------------------------------------------------------------------------------
def serve(cfg: ServeConfig) -> int:
    """Runs the server until SIGTERM / SIGINT: the first signal drains (new requests get 503, those
    in flight finish) for cfg.shutdown_timeout seconds, then what is left ends with finish_reason
    "abort" and the process exits 0; a second signal exits at once."""
    import uvicorn

    from fastlm.native_memory import malloc_settings

    malloc_settings()  # glibc: freed blocks of ever-new sizes go back to the OS (fastlm/native_memory.py)
    st = State(cfg)
    app = build_app(cfg, st)
    asgi = Gate(app, st)
    if cfg.cors_allow_origin:
        from starlette.middleware.cors import CORSMiddleware

        asgi = CORSMiddleware(asgi, allow_origins=list(cfg.cors_allow_origin), allow_methods=["*"],
                              allow_headers=["*"])
    st.engine.start()
    config = uvicorn.Config(asgi, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = _Server(config, st)
    try:
        server.run()
    finally:
        st.engine.stop()
        st.tok.shutdown()
    return 0


class _Server:
    """uvicorn's Server with a draining first signal."""

    def __new__(cls, config, st: State):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if st.draining:  # a second signal: stop now
                    self.should_exit = self.force_exit = True
                    return
                st.draining = True
                log.info("fastlm serve: signal %s: draining for up to %.0f s", sig, st.cfg.shutdown_timeout)
                threading.Thread(target=self._drain, daemon=True).start()

            def _drain(self):
                end = time.monotonic() + st.cfg.shutdown_timeout
                eng = st.engine
                while time.monotonic() < end and st.in_flight > 0:
                    time.sleep(0.05)
                if isinstance(eng, GenerationEngine) and st.in_flight > 0:
                    eng.abort_all()
                    t = time.monotonic() + 5
                    while time.monotonic() < t and st.in_flight > 0:
                        time.sleep(0.05)
                self.should_exit = True

        return Server(config)


__all__ = ["ServeConfig", "build_app", "serve"]
