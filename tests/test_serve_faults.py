"""`fastlm serve` under faults and limits, over real HTTP on 127.0.0.1: API key (401, /health open),
CORS, payload limit (413), bounded concurrency (429 + Retry-After), a client leaving mid-stream
(its slot is free at the next step: later requests run at full batch), --request-timeout (408), and
SIGTERM under load (new requests 503, a short request finishes, a long one ends with finish_reason
"abort", exit 0). The GPT-2 here is random but large enough (6 x 512) that 1000 tokens take seconds."""

import asyncio
import json
import signal
import time

import pytest

pytest.importorskip("fastapi", reason="pip install 'fastlm[serve]'")
httpx = pytest.importorskip("httpx")

from serve_util import Server, gpt2_checkpoint, running  # noqa: E402

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 1000  # tokens: seconds of decoding at this model size


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    d = gpt2_checkpoint(tmp_path_factory.mktemp("gpt2big"), n_layer=6, n_embd=512, n_head=8, n_positions=1024)
    s = {"main": Server(d, "--max-num-seqs", "2", "--request-timeout", "2.5", "--api-key", KEY,
                        "--cors-allow-origin", "http://example.com", "--payload-limit", "4000"),
         "drain": Server(d, "--max-num-seqs", "2", "--max-concurrent-requests", "4", "--shutdown-timeout", "4",
                         "--api-key", KEY)}
    with running(s):
        yield s


def metric(url, name, **labels) -> float:
    """The value of one sample of the server's /metrics (prometheus_client's own text parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=AUTH).text
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                return smp.value
    raise AssertionError(f"{name} {labels} not in /metrics:\n{text}")


def test_api_key_cors_payload(servers):
    url = servers["main"].url
    assert httpx.get(url + "/health").status_code == 200  # open without the key
    for path in ("/info", "/metrics", "/v1/models"):
        r = httpx.get(url + path)
        assert r.status_code == 401, path
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url + "/v1/completions", json={"prompt": "the man", "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    pre = httpx.options(url + "/v1/completions", headers={"Origin": "http://example.com",
                                                          "Access-Control-Request-Method": "POST"})
    assert pre.headers.get("access-control-allow-origin") == "http://example.com"
    other = httpx.options(url + "/v1/completions", headers={"Origin": "http://evil.com",
                                                            "Access-Control-Request-Method": "POST"})
    assert other.headers.get("access-control-allow-origin") is None
    r = httpx.post(url + "/v1/completions", json={"prompt": "a " * 3000}, headers=AUTH)
    assert r.status_code == 413 and "4000" in r.json()["error"]["message"]


async def _stream(ac, url, max_tokens, started: asyncio.Event | None = None, stop_after: int | None = None,
                  leave: asyncio.Event | None = None):
    """One streamed completion: (finish_reason or None when we left, chunks read, saw [DONE])."""
    body = {"prompt": [2, 3, 4], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    finish, n, done = None, 0, False
    async with ac.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ev = json.loads(line[6:])
            n += 1
            if started is not None and not started.is_set():
                started.set()
            if ev["choices"] and ev["choices"][0]["finish_reason"]:
                finish = ev["choices"][0]["finish_reason"]
            if (stop_after is not None and n >= stop_after) or (leave is not None and leave.is_set()):
                return None, n, False  # leave mid-stream: the connection closes
    return finish, n, done


def test_429_when_full(servers):
    url = servers["drain"].url

    async def main():
        async with httpx.AsyncClient(timeout=60) as ac:
            leave = asyncio.Event()
            hold = [asyncio.ensure_future(_stream(ac, url, LONG, leave=leave)) for _ in range(4)]
            end = time.monotonic() + 60
            while metric(url, "fastlm_requests_in_flight") < 4 and time.monotonic() < end:
                await asyncio.sleep(0.01)
            # 4 requests in flight (--max-concurrent-requests 4): the next one is refused at once
            r = await ac.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=AUTH)
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
            leave.set()
            results = await asyncio.gather(*hold)
            assert all(f is None for f, _, _ in results), results  # every one left mid-stream

    asyncio.run(main())
    assert metric(url, "fastlm_request_failure_total", route="/v1/completions", reason="overloaded") == 1


def test_disconnect_frees_slots(servers):
    url = servers["drain"].url  # no --request-timeout there: slow machines stay correct

    async def main():
        async with httpx.AsyncClient(timeout=60) as ac:
            tokens0 = metric(url, "fastlm_generation_tokens_total")
            results = await asyncio.gather(*(_stream(ac, url, LONG, stop_after=3) for _ in range(2)))
            assert all(f is None for f, _, _ in results), results  # both left after 3 chunks
            end = time.monotonic() + 20
            while metric(url, "fastlm_running") > 0 and time.monotonic() < end:
                await asyncio.sleep(0.02)
            assert metric(url, "fastlm_running") == 0
            # the engine stopped making their tokens: far fewer than 2 x LONG were made
            assert metric(url, "fastlm_generation_tokens_total") - tokens0 < LONG / 2
            # the freed slots serve new requests, two at a time (--max-num-seqs 2: a full batch)
            before = metric(url, "fastlm_batch_size_bucket", le="1.0"), metric(url, "fastlm_batch_size_count")
            res = await asyncio.gather(*(_stream(ac, url, 12) for _ in range(2)))
            assert all(f == "length" and done for f, _, done in res), res
            after = metric(url, "fastlm_batch_size_bucket", le="1.0"), metric(url, "fastlm_batch_size_count")
            assert after[1] - before[1] > after[0] - before[0]  # some decode steps ran both sequences

    asyncio.run(main())


def test_request_timeout(servers):
    url = servers["main"].url

    async def main():
        async with httpx.AsyncClient(timeout=60) as ac:
            t0 = time.monotonic()
            rs = await asyncio.gather(*(ac.post(url + "/v1/completions", headers=AUTH,
                                                json={"prompt": [2, 3], "max_tokens": LONG, "ignore_eos": True})
                                        for _ in range(2)))
            took = time.monotonic() - t0
            for r in rs:
                assert r.status_code == 408, r.text
                assert "--request-timeout" in r.json()["error"]["message"]
            assert took < 15
            end = time.monotonic() + 10
            while metric(url, "fastlm_running") > 0 and time.monotonic() < end:
                await asyncio.sleep(0.02)
            assert metric(url, "fastlm_running") == 0  # their slots were freed
            r = await ac.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 3}, headers=AUTH)
            assert r.status_code == 200

    asyncio.run(main())


def test_disconnect_non_streaming_frees_slot(servers):
    url = servers["main"].url
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.3 s and closes the connection
        httpx.post(url + "/v1/completions", json={"prompt": [2, 3], "max_tokens": LONG, "ignore_eos": True},
                   headers=AUTH, timeout=httpx.Timeout(10, read=0.3))
    end = time.monotonic() + 20
    while metric(url, "fastlm_running") > 0 and time.monotonic() < end:
        time.sleep(0.02)
    assert metric(url, "fastlm_running") == 0 and metric(url, "fastlm_requests_in_flight") == 0
    made = metric(url, "fastlm_generation_tokens_total")
    time.sleep(0.3)
    assert metric(url, "fastlm_generation_tokens_total") == made  # no token made for the gone client


def test_sigterm_drains_under_load(servers):
    srv = servers["drain"]
    url = srv.url

    async def main():
        async with httpx.AsyncClient(timeout=60) as ac:
            starts = [asyncio.Event() for _ in range(2)]  # --max-num-seqs 2: both run from the start
            short = [asyncio.ensure_future(_stream(ac, url, 3, starts[0]))]  # a step or two left at the signal
            long = [asyncio.ensure_future(_stream(ac, url, LONG, starts[1]))]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 60)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            try:  # new requests: 503 while draining (or refused once the server has gone)
                r = await ac.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=AUTH)
                assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
                assert (await ac.get(url + "/health")).status_code == 503
            except httpx.ConnectError:
                pass
            t0 = time.monotonic()
            s_res = await asyncio.gather(*short)
            t_short = time.monotonic() - t0
            l_res = await asyncio.gather(*long)
            return s_res, l_res, t_short

    s_res, l_res, t_short = asyncio.run(main())
    assert all(f == "length" and done for f, _, done in s_res), (s_res, t_short)  # finished within the drain
    assert all(f == "abort" and done for f, _, done in l_res), l_res  # cut at --shutdown-timeout
    assert srv.proc.wait(30) == 0
