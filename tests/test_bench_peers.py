"""`fastlm bench --suite peers`: the CTranslate2 baseline computes what fastlm computes (same
converted random model), ONNX Runtime and OpenVINO compute what transformers computes (fp32 exactly,
bf16 math and int8 within their own error), the GPT-2 floor counts the bytes a decode step streams,
and the suite runs end to end on tiny models (each engine in its own process). Timing itself is not
asserted. onnxruntime, onnx, openvino and nncf are in the dev extra: their tests do not skip."""

import importlib.util
import os

import numpy as np
import pytest
import torch
import transformers as tf

import fastlm
from fastlm.bench import plots, report
from fastlm.bench.peers import ctranslate2_engine, onnxruntime_engine, openvino_engine, suite, worker, workloads
from fastlm.bench.peers.registry import engines, providers
from fastlm.bench.peers.workloads import PEER_CASES
from fastlm.bench.result import Skip

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


def test_peer_cases_follow_suite_device_and_optional_engines(monkeypatch):
    ct2 = ctranslate2_engine.ENGINE
    for e in engines().values():
        if e.optional:  # none installed
            monkeypatch.setattr(e, "missing", lambda e=e: f"{e.module} is not installed (pip install 'fastlm[peers]')")
    assert suite.peer_cases("cpu", "ops", None) == ([], None)
    got, why = suite.peer_cases("cpu", "all", None)
    assert got == [] and "--suite peers" in why and "ctranslate2" not in why  # a plain `fastlm bench` stays short
    assert suite.peer_cases("cpu", "peers", None)[0] == list(PEER_CASES)  # the rest still runs
    assert suite.peer_cases("cuda", "peers", None)[0] == []
    assert suite.peer_cases("cpu", "all", "peers_bert_fwd")[0] == ["peers_bert_fwd"]
    assert suite.peer_cases("cpu", "all", "attention")[0] == []
    monkeypatch.setattr(ct2, "missing", lambda: None)
    got, why = suite.peer_cases("cpu", "all", None)  # installed engines are named, not run
    assert got == [] and "ctranslate2" in why


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


def test_onnxruntime_bert_is_fused_and_equals_transformers(cache):
    """The exported graph gets ORT's fused Attention in every layer; the fp32 session equals
    transformers' BertModel, the quantize_dynamic int8 one is int8 (QAttention, MatMulInteger) and
    within int8's error of it."""
    import onnx

    d = worker.prepare(cache, "bert", "tiny", "onnxruntime")
    out = onnxruntime_engine.converted_dir(d)
    ops = {n.op_type for n in onnx.load(os.path.join(out, "model_opt.onnx")).graph.node}
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"} <= ops, ops
    ops8 = {n.op_type for n in onnx.load(os.path.join(out, "model_opt_int8.onnx")).graph.node}
    assert {"QAttention", "MatMulInteger"} <= ops8, ops8
    ids = torch.randint(0, 1000, (3, 37), generator=torch.Generator().manual_seed(7))
    want = tf.BertModel.from_pretrained(d).eval()(input_ids=ids).last_hidden_state.detach()
    assert want.std() > 0.5
    e = onnxruntime_engine.ENGINE
    run, per = e.runner("bert", "fp32", d, ids, 1)
    assert per == 1 and e.ran_math() == "fp32 (2/2 attention layers fused)"
    got = torch.from_numpy(run()[0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    run8, _ = e.runner("bert", "int8", d, ids, 1)
    err = (torch.from_numpy(run8()[0]) - want).abs().max().item()
    assert 1e-3 < err < 0.15, err  # quantized (not the fp32 graph), and close
    with pytest.raises(Skip, match="BERT row only"):
        e.runner("gpt2", "fp32", d, ids, 1)


def _ov_prefill_logits(compiled, ids):
    req = compiled.create_infer_request()
    req.reset_state()
    req.infer({"input_ids": ids.numpy(), "position_ids": np.arange(ids.shape[1])[None]})
    return torch.from_numpy(req.get_output_tensor(0).data[0].copy())


def test_openvino_gpt2_greedy_tokens_equal_transformers(cache):
    """The stateful OpenVINO GPT-2 with f32 math decodes transformers' greedy tokens; its default
    math (bf16 on CPUs with AVX512_BF16) and the int8-weight model give transformers' logits within
    their error; each row names the math the compiled model reports."""
    d = worker.prepare(cache, "gpt2", "tiny", "openvino")
    path = os.path.join(openvino_engine.converted_dir(d), "gpt2_{}.xml")
    ref = tf.GPT2LMHeadModel.from_pretrained(d).eval()
    f32 = openvino_engine.compile_model(path.format("fp32"), 1, "f32")
    assert openvino_engine.math_of(f32) == "fp32"
    for seed in (0, 1):
        ids = torch.randint(0, 999, (1, 16), generator=torch.Generator().manual_seed(seed))
        want = ref.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)[0, 16:]
        assert len(set(want.tolist())) >= 6, want
        assert openvino_engine.greedy(f32.create_infer_request(), ids.numpy(), 24) == want.tolist()
    logits = ref(ids).logits[0, -1].detach()
    for precision, hint in (("fp32", None), ("int8", None), ("int8", "f32")):
        got = _ov_prefill_logits(openvino_engine.compile_model(path.format(precision), 1, hint), ids)
        err = ((got - logits).abs().max() / logits.std()).item()
        assert err < 0.3 and torch.cosine_similarity(got, logits, dim=0) > 0.995, (precision, hint, err)
        if precision == "int8":
            assert err > 1e-3, err  # int8 weights, not the fp32 model
    e = openvino_engine.ENGINE
    run, per = e.runner("gpt2", "int8", d, ids, 1)
    assert per == workloads.GPT2_NEW
    default = openvino_engine.math_of(openvino_engine.compile_model(path.format("fp32"), 1, None))
    assert e.ran_math().startswith(f"int8 weights, {default} math"), e.ran_math()


def test_openvino_bert_equals_transformers(cache):
    from fastlm.bench.peers import openvino_f32_engine

    d = worker.prepare(cache, "bert", "tiny", "openvino")
    ids = torch.randint(0, 1000, (3, 37), generator=torch.Generator().manual_seed(9))
    want = tf.BertModel.from_pretrained(d).eval()(input_ids=ids).last_hidden_state.detach()
    assert want.std() > 0.5
    f32 = openvino_f32_engine.ENGINE
    run, _ = f32.runner("bert", "fp32", d, ids, 1)
    assert f32.ran_math() == "fp32 (INFERENCE_PRECISION_HINT fp32)"
    torch.testing.assert_close(torch.from_numpy(run()[0]), want, atol=1e-4, rtol=1e-4)
    for e in (openvino_engine.ENGINE, f32):
        for precision in ("fp32", "int8"):
            run, _ = e.runner("bert", precision, d, ids, 1)
            err = (torch.from_numpy(run()[0]) - want).abs().max().item()
            assert err < 0.15, (e.name, precision, err)
            assert "INFERENCE_PRECISION_HINT" in e.ran_math()
            if precision == "int8":
                assert err > 1e-3 and e.ran_math().startswith("int8 + "), (err, e.ran_math())


@needs_ct2
def test_peers_suite_runs_every_engine_in_its_own_process(cache, tmp_path, monkeypatch):
    """The whole pipeline on tiny models: rows for each engine and precision (fastlm int8 skips with
    its reason until quantize= lands), the markdown table and the bar plot."""
    monkeypatch.setenv("FASTLM_BENCH_CACHE", cache)
    names = ("ctranslate2", "fastlm", "transformers")  # ~4 processes per engine: the others run in-process below
    cases = ["peers_gpt2_decode", "peers_bert_fwd"]  # the batched-decode cases: test_peers_suite_batched_decode_rows
    rows, read = suite.run_peers(cases, rounds=1, calls=1, threads=1, size="tiny", names=names)
    assert read and read > 0.1
    by = {(r.case, r.provider): r for r in rows}
    assert set(by) == {(c, p) for c in cases for p, n, _ in providers() if n in names}
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


def test_worker_times_onnxruntime_and_openvino_and_names_their_math(cache, capsys):
    """The worker's `time` action (what the suite runs in a process per engine), in-process here:
    ONNX Runtime's BERT rows and its GPT-2 skip; OpenVINO with f32 math on GPT-2."""
    import json

    worker.prepare(cache, "bert", "tiny", "onnxruntime")
    worker.prepare(cache, "gpt2", "tiny", "openvino_f32")
    for work, name, precision, math in (("bert", "onnxruntime", "fp32", "fp32 (2/2 attention layers fused)"),
                                        ("bert", "onnxruntime", "int8", "int8 (quantize_dynamic; 2/2 attention"),
                                        ("gpt2", "openvino_f32", "fp32", "fp32 (INFERENCE_PRECISION_HINT fp32)")):
        assert worker.main(["time", "--work", work, "--engine", name, "--precision", precision, "--cache", cache,
                            "--size", "tiny", "--calls", "1", "--threads", "1"]) == 0
        out = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert out["ms"][0] > 0 and out["math"].startswith(math), out
    worker.main(["time", "--work", "gpt2", "--engine", "onnxruntime", "--cache", cache, "--size", "tiny"])
    assert "ONNX Runtime runs the BERT row only" in capsys.readouterr().out


def _gpt2_logits_from_gguf(t: dict, ids: list[int], eps: float, heads: int) -> np.ndarray:
    """GPT-2 as llama.cpp's graph computes it, in numpy, from GGUF tensors (name -> (out, in) array):
    the logits of the last position."""
    def ln(x, name):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * t[name + ".weight"] \
            + t[name + ".bias"]

    def lin(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    x = t["token_embd.weight"][ids] + t["position_embd.weight"][: len(ids)]
    n, d = x.shape
    hd = d // heads
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(sum(name.endswith("attn_qkv.weight") for name in t)):
        q, k, v = np.split(lin(ln(x, f"blk.{i}.attn_norm"), f"blk.{i}.attn_qkv"), 3, axis=-1)
        q, k, v = (a.reshape(n, heads, hd).transpose(1, 0, 2) for a in (q, k, v))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        p = np.exp(s - s.max(-1, keepdims=True))
        a = (p / p.sum(-1, keepdims=True)) @ v
        x = x + lin(a.transpose(1, 0, 2).reshape(n, d), f"blk.{i}.attn_output")
        h = lin(ln(x, f"blk.{i}.ffn_norm"), f"blk.{i}.ffn_up")
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))  # gelu_new
        x = x + lin(h, f"blk.{i}.ffn_down")
    return ln(x, "output_norm")[-1] @ t["token_embd.weight"].T  # the head tied to token_embd


def test_llamacpp_gguf_files_hold_gpt2_as_llamacpp_reads_it(cache):
    """The GGUF files prepare() writes (llama.cpp itself is not installed here: it builds from
    source) are the saved GPT-2: a numpy forward in llama.cpp's tensor names and layouts gives
    transformers' logits from the F32 file, and within Q8_0's error from the Q8_0 file, whose
    weights are Q8_0 and whose 1-D tensors and position table stay F32."""
    import gguf

    from fastlm.bench.peers import llamacpp_engine

    d = worker.prepare(cache, "gpt2", "tiny")
    llamacpp_engine.ENGINE.prepare("gpt2", d)
    ref = tf.GPT2LMHeadModel.from_pretrained(d).eval()
    ids = torch.randint(0, 999, (1, 23), generator=torch.Generator().manual_seed(3))
    want = ref(ids).logits[0, -1].detach().numpy()
    assert want.std() > 0.5
    got = {}
    for precision, f in llamacpp_engine.FILES.items():
        r = gguf.GGUFReader(os.path.join(llamacpp_engine.converted_dir(d), f))
        assert r.fields["general.architecture"].contents() == "gpt2"
        assert r.fields["gpt2.block_count"].contents() == 2 and r.fields["gpt2.context_length"].contents() == 128
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert len(types) == 4 + 2 * 12, types  # wte, wpe, ln_f (2); 12 per block; the head tied
        if precision == "int8":
            assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == "Q8_0"
            assert types["position_embd.weight"] == types["blk.1.ffn_down.bias"] == "F32"
        else:
            assert set(types.values()) == {"F32"}
        t = {x.name: gguf.quants.dequantize(x.data, x.tensor_type).astype(np.float64) for x in r.tensors}
        got[precision] = _gpt2_logits_from_gguf(t, ids[0].tolist(), ref.config.layer_norm_epsilon, ref.config.n_head)
    np.testing.assert_allclose(got["fp32"], want, atol=1e-4 * want.std(), rtol=1e-4)
    err = np.abs(got["int8"] - want).max() / want.std()
    assert 1e-4 < err < 0.3, err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (it builds llama.cpp from source, ~25 min)")
def test_llamacpp_greedy_tokens_equal_transformers(cache):
    from llama_cpp import Llama

    from fastlm.bench.peers import llamacpp_engine

    d = worker.prepare(cache, "gpt2", "tiny", "llamacpp")
    llm = Llama(model_path=os.path.join(llamacpp_engine.converted_dir(d), llamacpp_engine.FILES["fp32"]),
                n_ctx=64, n_threads=1, verbose=False)
    ref = tf.GPT2LMHeadModel.from_pretrained(d).eval()
    for seed in (0, 1):
        ids = torch.randint(0, 999, (1, 16), generator=torch.Generator().manual_seed(seed))
        want = ref.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)[0, 16:]
        assert llamacpp_engine.greedy(llm, ids[0].tolist(), 24) == want.tolist()


def test_the_math_an_engine_reports_reaches_the_row_the_table_and_the_plot(monkeypatch, tmp_path):
    """A worker's "math" (OpenVINO's INFERENCE_PRECISION_HINT) becomes Row.dtype and replaces the
    engine's math() in the markdown and the bar names; without it the table keeps math()."""
    from fastlm.bench.peers import openvino_f32_engine

    def fake_worker(args, threads, timeout):
        if args[0] == "bandwidth":
            return {"gbs": [10.0]}
        if args[0] == "prepare":
            return {"dir": "/nonexistent"}
        name = args[args.index("--engine") + 1]
        out = {"ms": [2.0], "cpu_ms": [3.0], "per": "call"}
        return {**out, "math": "bf16 (fp32 weights; INFERENCE_PRECISION_HINT bf16, the default)"} \
            if name == "openvino" and "fp32" in args else out

    monkeypatch.setattr(suite, "_worker", fake_worker)
    for e in (openvino_engine.ENGINE, openvino_f32_engine.ENGINE):
        monkeypatch.setattr(e, "missing", lambda: None)
    rows, read = suite.run_peers(["peers_gpt2_decode", "peers_bert_fwd"], rounds=1, calls=1, threads=1, size="tiny",
                                 names=["openvino", "openvino_f32"])
    by = {(r.case, r.provider): r for r in rows}
    assert len(rows) == 8 and all(r.status == "ok" for r in rows)
    assert by[("peers_bert_fwd", "openvino")].dtype.startswith("bf16 (fp32 weights")
    assert by[("peers_bert_fwd", "openvino_int8")].dtype == ""
    md = report.peers_markdown(rows, read)
    assert "| OpenVINO | bf16 (fp32 weights; INFERENCE_PRECISION_HINT bf16, the default) | 2.0" in md
    assert "| OpenVINO | int8 (the plugin's default math) | 2.0" in md
    assert "| OpenVINO (f32 math) | fp32 (INFERENCE_PRECISION_HINT=f32) | 2.0" in md
    fig = plots.peers_figure(rows, read)
    names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "OpenVINO bf16" in names and "OpenVINO (f32 math) fp32" in names, names
    with pytest.raises(ValueError, match="names must be registered engines"):
        suite.run_peers(list(PEER_CASES), size="tiny", names=["nope"])


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
    rows, read = suite.run_peers(["peers_gpt2_batch8"], rounds=1, calls=1, threads=1, size="tiny",
                                 names=("ctranslate2", "fastlm"))
    by = {r.provider: r for r in rows}
    for p in ("ctranslate2", "ctranslate2_int8", "fastlm", "fastlm_int8"):
        r = by[p]
        assert r.status == "ok" and r.unit == "tok/s" and r.value == pytest.approx(1e3 / r.ms), r
    md = report.peers_markdown(rows, read)
    assert "### Batched greedy decode" in md and "| B=8 tok/s |" in md and "| fastlm | fp32 |" in md
    png = plots.peers_plot(rows, read, str(tmp_path / "batch.png"))
    assert png and os.path.getsize(png) > 1000


def test_forced_isa_caps_each_engine_in_its_own_worker_and_heads_the_table(monkeypatch):
    """--isa avx2: every engine's worker gets its own capping environment (fastlm / torch vars,
    CT2_FORCE_CPU_ISA, OpenVINO f32's oneDNN cap), an engine that cannot be capped runs without one and
    is named so, OpenVINO's bf16 default skips with the reason, and the markdown opens with the forced
    ISA and the CPU's own flags."""
    seen = {}

    def fake_worker(args, threads, timeout, extra_env=None):
        if args[0] == "bandwidth":
            return {"gbs": [10.0]}
        if args[0] == "prepare":
            return {"dir": "/nonexistent"}
        seen[(args[args.index("--engine") + 1], args[args.index("--precision") + 1])] = extra_env
        return {"ms": [2.0], "cpu_ms": [3.0], "per": "call"}

    monkeypatch.setattr(suite, "_worker", fake_worker)
    names = ["fastlm", "ctranslate2", "onnxruntime", "openvino", "openvino_f32"]
    for n in names:
        monkeypatch.setattr(engines()[n], "missing", lambda: None)
    rows, _ = suite.run_peers(["peers_gpt2_decode"], rounds=1, calls=1, threads=1, size="tiny", names=names,
                              isa="avx2")
    assert seen[("fastlm", "int8")] == {"FASTLM_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                        "ATEN_CPU_CAPABILITY": "avx2"}
    assert seen[("ctranslate2", "fp32")] == {"CT2_FORCE_CPU_ISA": "AVX2"}
    assert seen[("openvino_f32", "fp32")] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert seen[("onnxruntime", "fp32")] is None
    assert ("openvino", "fp32") not in seen
    by = {r.provider: r for r in rows}
    assert by["openvino"].status.startswith("skipped: not run with the ISA forced to avx2")
    assert by["fastlm_int8"].status == "ok" and by["ctranslate2"].status == "ok"
    head = suite.isa_header("avx2", suite.isa_caps("avx2", names))
    assert head.startswith("**ISA forced to AVX2** on a CPU whose own flags are")
    assert "ONNX Runtime: no (" in head and "CTranslate2: yes (CT2_FORCE_CPU_ISA=AVX2)" in head
    assert "OpenVINO (f32 math): partly" in head
    with pytest.raises(ValueError, match="isa must be one of avx2"):
        suite.isa_caps("sse2")
