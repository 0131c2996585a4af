"""The embeddings baseline of `fastlm bench --suite serve`: sentence-transformers behind a minimal
FastAPI app with the same /v1/embeddings and /health routes (no batching across requests: each
request is one `encode` call, as a plain FastAPI wrapper does).
`python -m fastlm.bench.serve_st --model DIR --port P`."""

from __future__ import annotations

import argparse
import asyncio
import threading


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)

    import uvicorn
    from fastapi import FastAPI, Response
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.model, device="cpu")
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.post("/v1/embeddings")
    async def embeddings(body: dict):
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]

        def work():
            with lock:
                return model.encode(texts, batch_size=32)

        e = await asyncio.get_running_loop().run_in_executor(None, work)
        return {"object": "list", "data": [{"object": "embedding", "embedding": v.tolist(), "index": i}
                                           for i, v in enumerate(e)], "model": args.model}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
