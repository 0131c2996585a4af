"""`fastlm serve`: one model behind an HTTP endpoint (one process per model, as TEI).

- app.py: the FastAPI app, its routes (OpenAI-compatible /v1/*, TEI-compatible /embed /predict
  /rerank /tokenize, /health /info /metrics) and the server's start and graceful shutdown;
- protocol.py: pydantic models of every request and response;
- engine.py: the engine thread that owns the model (dynamic batching for encoders, continuous
  batching on a slot KV cache for GPT-2) and the tokenizer worker pool;
- errors.py: the OpenAI error envelope on /v1/* and TEI's {"error", "error_type"} elsewhere;
- metrics.py: Prometheus metrics (prometheus_client).

Needs the optional extra `fastlm[serve]` (fastapi, uvicorn, prometheus-client). docs/serve.md
documents the routes, flags and error codes."""
