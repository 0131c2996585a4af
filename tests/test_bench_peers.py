"""`fastlm bench --suite peers`: the CTranslate2 baseline computes what fastlm computes (same
converted random model), the GPT-2 floor counts the bytes a decode step streams, and the suite
runs end to end on tiny models (each engine in its own process). Timing itself is not asserted."""

import os

import pytest
import torch

import fastlm
from fastlm.bench import plots, report
from fastlm.bench.peers import ctranslate2_engine, suite, worker, workloads
from fastlm.bench.peers.registry import providers
from fastlm.bench.peers.workloads import PEER_CASES

try:
    import ctranslate2
except ImportError:  # the optional extra: pip install 'fastlm[peers]'
    ctranslate2 = None

needs_ct2 = pytest.mark.skipif(ctranslate2 is None, reason="ctranslate2 is not installed (pip install 'fastlm[peers]')")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("peers"))


def test_gpt2_floor_counts_the_weights_a_decode_step_reads():
    """fp32: every parameter of GPT-2 small but the position table, the tied head counted once (as
    transformers' model holds it), against the formula; int8: a quarter of that plus fp32 extras."""
    import transformers as tf

    with torch.device("meta"):
        m = tf.GPT2LMHeadModel(tf.GPT2Config())
    n = sum(p.numel() for name, p in m.named_parameters() if "wpe" not in name)  # wte == lm_head, once
    assert workloads.gpt2_weight_bytes("fp32") == 4 * n
    assert 490e6 < workloads.gpt2_weight_bytes("fp32") < 500e6
    i8 = workloads.gpt2_weight_bytes("int8")
    assert n < i8 < n + 1e6  # int8 weights + fp32 scales, biases, LayerNorms
    assert workloads.floor_ms(25.0, "fp32") == pytest.approx(4 * n / 25e9 * 1e3)
    assert workloads.floor_ms(None, "fp32") is None


def test_peer_cases_follow_suite_device_and_ctranslate2(monkeypatch):
    ct2 = ctranslate2_engine.ENGINE
    monkeypatch.setattr(ct2, "missing", lambda: "ctranslate2 is not installed (pip install 'fastlm[peers]')")
    assert suite.peer_cases("cpu", "ops", None) == ([], None)
    got, why = suite.peer_cases("cpu", "all", None)
    assert got == [] and "ctranslate2 is not installed" in why  # a plain `fastlm bench` stays short
    assert suite.peer_cases("cpu", "peers", None)[0] == list(PEER_CASES)  # the rest still runs
    assert suite.peer_cases("cuda", "peers", None)[0] == []
    assert suite.peer_cases("cpu", "all", "peers_bert_fwd")[0] == ["peers_bert_fwd"]
    assert suite.peer_cases("cpu", "all", "attention")[0] == []
    monkeypatch.setattr(ct2, "missing", lambda: None)
    assert suite.peer_cases("cpu", "all", None)[0] == list(PEER_CASES)


@needs_ct2
def test_ctranslate2_bert_equals_fastlm_on_the_converted_model(cache):
    d = worker.prepare(cache, "bert", "tiny", "ctranslate2")
    enc = ctranslate2.Encoder(ctranslate2_engine.converted_dir(d), device="cpu",
                              compute_type="float32", intra_threads=1)
    ids = torch.randint(0, 1000, (3, 37), generator=torch.Generator().manual_seed(5))
    got = torch.as_tensor(__import__("numpy").array(enc.forward_batch(ids.tolist()).last_hidden_state))
    want = fastlm.from_pretrained(d)(ids).last_hidden_state
    assert got.shape == want.shape == (3, 37, 64)
    assert want.std() > 0.5 and not torch.isnan(got).any()  # a real, non-constant output
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@needs_ct2
def test_ctranslate2_gpt2_greedy_tokens_equal_fastlm(cache):
    d = worker.prepare(cache, "gpt2", "tiny", "ctranslate2")
    gen = ctranslate2.Generator(ctranslate2_engine.converted_dir(d), device="cpu",
                                compute_type="float32", intra_threads=1)
    model = fastlm.from_pretrained(d)
    for seed in (0, 1):
        ids = torch.randint(0, 999, (1, 16), generator=torch.Generator().manual_seed(seed))
        want = model.generate(ids, max_new_tokens=24)[0, 16:].tolist()
        r = gen.generate_batch([ctranslate2_engine.gen_tokens(d, ids[0].tolist())], max_length=24, min_length=24,
                               sampling_topk=1, include_prompt_in_result=False)
        assert len(set(want)) >= 6, want  # initializer_range 0.4: a diverse, meaningful comparison
        assert r[0].sequences_ids[0] == want


@needs_ct2
def test_peers_suite_runs_every_engine_in_its_own_process(cache, tmp_path, monkeypatch):
    """The whole pipeline on tiny models: rows for each engine and precision (fastlm int8 skips with
    its reason until quantize= lands), the markdown table and the bar plot."""
    monkeypatch.setenv("FASTLM_BENCH_CACHE", cache)
    cases = ["peers_gpt2_decode", "peers_bert_fwd"]  # the batched-decode cases: the test below
    rows, read = suite.run_peers(cases, rounds=1, calls=1, threads=1, size="tiny")
    assert read and read > 0.1
    by = {(r.case, r.provider): r for r in rows}
    assert set(by) == {(c, p) for c in cases for p, _, _ in providers()}
    for case in cases:
        for p in ("ctranslate2", "ctranslate2_int8", "fastlm", "transformers"):
            assert by[(case, p)].status == "ok" and by[(case, p)].ms > 0, by[(case, p)]
        r = by[("peers_bert_fwd", "transformers_int8")]
        assert r.status == "ok" and r.ms > 0, r
        assert by[("peers_gpt2_decode", "transformers_int8")].status.startswith("skipped: torch's dynamic int8")
        r = by[(case, "fastlm_int8")]
        assert (r.status == "ok" and r.ms > 0) or r.status.startswith("skipped: "), r
    md = report.peers_markdown(rows, read)
    assert "| CTranslate2 | int8 |" in md and "floor:" in md
    png = plots.peers_plot(rows, read, str(tmp_path / "peers.png"))
    assert png and os.path.getsize(png) > 1000


def test_worker_reports_a_missing_engine_as_a_skip_not_a_crash(cache, capsys):
    workloads.prepare(cache, "bert", "tiny")
    workloads.prepare(cache, "gpt2", "tiny")
    assert worker.main(["time", "--work", "gpt2", "--engine", "transformers", "--precision", "int8",
                        "--cache", cache, "--size", "tiny"]) == 0
    assert '"skip": "torch\'s dynamic int8 quantization covers nn.Linear' in capsys.readouterr().out
    with pytest.raises(ValueError, match="engine must be"):
        worker.main(["time", "--work", "bert", "--engine", "nope", "--cache", cache, "--size", "tiny"])


@needs_ct2
def test_ctranslate2_batched_greedy_tokens_equal_fastlm(cache):
    """The batched-decode rows compare the same work: CTranslate2's generate_batch of B prompts
    makes fastlm's batched greedy tokens (its one-call batched step, csrc/decode_batch_cpu.cpp)."""
    d = worker.prepare(cache, "gpt2_b8", "tiny", "ctranslate2")
    gen = ctranslate2.Generator(ctranslate2_engine.converted_dir(d), device="cpu",
                                compute_type="float32", intra_threads=1)
    ids = workloads.inputs("gpt2_b8", 1000)
    assert ids.shape == (8, workloads.GPT2_PROMPT)
    want = fastlm.from_pretrained(d).generate(ids, max_new_tokens=20)[:, 16:].tolist()
    r = gen.generate_batch([ctranslate2_engine.gen_tokens(d, row.tolist()) for row in ids], max_length=20,
                           min_length=20, sampling_topk=1, include_prompt_in_result=False)
    assert len({t for w in want for t in w}) >= 20, want
    assert [x.sequences_ids[0] for x in r] == want


@needs_ct2
def test_peers_suite_batched_decode_rows(cache, tmp_path, monkeypatch):
    """A batched-decode case end to end on the tiny model: tokens/s rows for the engines with a
    batched runner, their table and the plot (higher is better there)."""
    monkeypatch.setenv("FASTLM_BENCH_CACHE", cache)
    rows, read = suite.run_peers(["peers_gpt2_batch8"], rounds=1, calls=1, threads=1, size="tiny")
    by = {r.provider: r for r in rows}
    for p in ("ctranslate2", "ctranslate2_int8", "fastlm", "fastlm_int8"):
        r = by[p]
        assert r.status == "ok" and r.unit == "tok/s" and r.value == pytest.approx(1e3 / r.ms), r
    md = report.peers_markdown(rows, read)
    assert "### Batched greedy decode" in md and "| B=8 tok/s |" in md and "| fastlm | fp32 |" in md
    png = plots.peers_plot(rows, read, str(tmp_path / "batch.png"))
    assert png and os.path.getsize(png) > 1000
