"""The serve engine's static, bucketed decode step (fastlm/serve/static_step.py: what a CUDA graph
replays on GPU), run eagerly on CPU with FASTLM_SERVE_STATIC_STEP=1: continuous batching with padding
rows, a chunked prefill in progress beside the running batch, and slots leaving mid-generation must
give model.generate's tokens request by request."""

import time

import pytest
import torch

pytest.importorskip("fastapi", reason="pip install 'fastlm[serve]'")

from serve_util import gpt2_checkpoint  # noqa: E402
from test_serve_engine import run  # noqa: E402

import fastlm  # noqa: E402
from fastlm.serve import static_step  # noqa: E402
from fastlm.serve.engine import GenerationEngine  # noqa: E402
from fastlm.serve.metrics import Metrics  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return gpt2_checkpoint(tmp_path_factory.mktemp("gpt2s"), n_layer=2, n_embd=64, n_head=4, n_positions=96)


@pytest.fixture(scope="module")
def engine(ckpt):
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTLM_SERVE_STATIC_STEP", "1")
    e = GenerationEngine(ckpt, Metrics(), max_num_seqs=5, max_prefill_tokens=6)  # buckets 1, 2, 4, 5
    e.start()
    end = time.monotonic() + 120
    while not e.ready and e.fatal is None and time.monotonic() < end:
        time.sleep(0.05)
    mp.undo()
    assert e.ready, e.fatal
    assert e._static is not None and not e._static.graphs
    yield e
    e.stop()


def test_buckets():
    assert static_step.buckets(1) == [1]
    assert static_step.buckets(5) == [1, 2, 4, 5]
    assert static_step.buckets(32) == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="slots must be >= 1"):
        static_step.buckets(0)


def test_wanted(monkeypatch):
    monkeypatch.delenv("FASTLM_SERVE_STATIC_STEP", raising=False)
    assert static_step.wanted(torch.device("cpu")) == (False, False)
    assert static_step.wanted(torch.device("cuda")) == (True, True)
    monkeypatch.setenv("FASTLM_CUDA_GRAPHS", "0")
    assert static_step.wanted(torch.device("cuda")) == (False, False)
    monkeypatch.setenv("FASTLM_SERVE_STATIC_STEP", "1")
    assert static_step.wanted(torch.device("cpu")) == (True, False)


def test_static_step_equals_generate(engine, ckpt):
    """Prompts up to 40 tokens prefill in chunks of 6 while others decode in padded buckets (n = 3 runs
    in bucket 4, whose padding row is the slot being prefilled): a padding row that wrote any row but
    the next prefill row there would change that prompt's tokens."""
    model = fastlm.from_pretrained(ckpt)
    g = torch.Generator().manual_seed(7)
    lens = [3, 40, 1, 22, 9, 33, 2, 14]
    news = [25, 7, 30, 5, 18, 9, 12, 3]
    prompts = [torch.randint(1, 18, (n,), generator=g).tolist() for n in lens]
    got = run(engine, prompts, [dict(max_new_tokens=n, do_sample=False, eos_token_id=[]) for n in news])
    for p, n, (toks, fin) in zip(prompts, news, got, strict=True):
        ref = model.generate(torch.tensor([p]), max_new_tokens=n, eos_token_id=[])[0, len(p):].tolist()
        assert toks == ref and fin == ("length",)


def test_static_step_cancel_moves_rows(engine, ckpt):
    model = fastlm.from_pretrained(ckpt)
    prompts = [[2, 3, 4], [5, 6, 7, 8, 9], [10, 11], [12], [13, 14, 15, 16, 17, 1, 9, 3, 8, 5, 4], [16, 2]]
    got = run(engine, prompts, [dict(max_new_tokens=20, do_sample=False, eos_token_id=[])] * 6,
              cancel_after={0: 3, 3: 6})
    assert got[0][1] == ("abort",) and got[3][1] == ("abort",)
    for i in (1, 2, 4, 5):
        ref = model.generate(torch.tensor([prompts[i]]), max_new_tokens=20, eos_token_id=[])[0, len(prompts[i]):]
        assert got[i] == (ref.tolist(), ("length",)), i
    assert engine.active == [] and not engine.waiting


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/device_check.sh runs this)")
def test_cuda_graph_steps_equal_eager_static(ckpt, monkeypatch):
    """On GPU: the engine replaying captured graphs gives the tokens of the same padded, bucketed step
    run eagerly (the same kernels), across joins, chunked prefills and leaves."""
    g = torch.Generator().manual_seed(3)
    lens, news = [3, 40, 1, 22, 9, 33, 2], [25, 7, 30, 5, 18, 9, 12]
    prompts = [torch.randint(1, 18, (n,), generator=g).tolist() for n in lens]
    kws = [dict(max_new_tokens=n, do_sample=False, eos_token_id=[]) for n in news]
    out = {}
    for graphs in ("1", "0"):
        monkeypatch.setenv("FASTLM_CUDA_GRAPHS", graphs)
        monkeypatch.setenv("FASTLM_SERVE_STATIC_STEP", "1")
        e = GenerationEngine(ckpt, Metrics(), device="cuda", dtype=torch.float32, max_num_seqs=5,
                             max_prefill_tokens=6)
        e.start()
        end = time.monotonic() + 300
        while not e.ready and e.fatal is None and time.monotonic() < end:
            time.sleep(0.05)
        try:
            assert e.ready, e.fatal
            assert e._static.graphs == (graphs == "1")
            out[graphs] = run(e, prompts, kws)
        finally:
            e.stop()
    assert out["1"] == out["0"]
    assert all(f == ("length",) for _, f in out["1"])
