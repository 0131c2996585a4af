"""What `fastlm bench` draws and prints (issue 24, section 3): one-shape cases on a categorical axis,
swept cases ticked at the measured values and labelled with what varied, throughput axes from 0,
each case's own dtype in its title, values in units that read (GFLOP/s on CPU), no % of a ceiling
over 100 or of a ceiling that does not bound the row, the spread of the timed calls in the rows, the
JSON and the markdown, peers that did not run named with their install command, `--compare` on a
bad file one line and exit 2, and every output file written atomically. Nothing here asserts a
timing."""

import json
import os
import re

import pytest
import torch

from fastlm import textio
from fastlm.bench import plots, report, runner
from fastlm.bench.ops_ffn import ffn_int8_cases
from fastlm.bench.peers import ctranslate2_engine
from fastlm.bench.peers.registry import providers
from fastlm.bench.peers.workloads import LABELS, PEER_CASES, UNITS, WORKS
from fastlm.bench.result import Case, Ceilings, Result, Row, Timing, format_value, load_json, save_json, timing
from fastlm.cli import main

INSTALL = "pip install 'fastlm[peers]'"


def _result(rows, cache=32 << 20, dtype="float32") -> Result:
    env = {"torch": "2", "triton": "3", "transformers": "5", "fastlm": "0.1", "git_sha": "abc", "cpu_threads": 2}
    return Result(env=env, device="cpu", dtype=dtype, suite="all", rows=rows,
                  ceilings=Ceilings(copy_gbs=30.0, matmul_tflops=0.25, matmul_dtype=dtype, cache_bytes=cache))


def _row(case, label, provider, x, samples, unit="tok/s", work=1000.0, x_name="", **kw) -> Row:
    """A measured row: `samples` ms per call, value = work per second (or ms for "ms")."""
    t = Timing.of(samples)
    value = t.median if unit == "ms" else work / (t.median / 1e3)
    return Row(case, label, provider, x=x, ms=t.median, value=value, unit=unit, x_name=x_name, ms_min=t.min,
               ms_q1=t.q1, ms_q3=t.q3, ms_max=t.max, n=t.n, **kw)


def _tick_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


# -- plots ----------------------------------------------------------------------------------

def test_a_one_shape_case_is_bars_on_a_categorical_axis_of_its_shapes_from_zero():
    rows = [_row("bert_fwd", "BERT-base B2 S128", p, 128, s, work=256, x_name="sequence length")
            for p, s in (("fastlm", [300.0, 310, 330]), ("hf_eager", [290.0, 320, 350]))]
    rows.append(Row("bert_fwd", "BERT-base B2 S128", "torch_compile", x=128, unit="tok/s",
                    status="skipped: torch.compile baseline runs on GPU only"))
    fig = plots.case_figure(_result(rows), "bert_fwd", rows)
    ax = fig.axes[0]
    assert _tick_labels(ax) == ["BERT-base B2 S128"]  # the shape itself, no made-up numbers
    assert ax.get_xscale() == "linear" and ax.get_ylim()[0] == 0
    assert "shape" in ax.get_xlabel() and "sequence length" not in ax.get_xlabel()
    bars = [c for c in ax.containers if type(c).__name__ == "BarContainer"]
    assert len(bars) == 2 and [b.get_label() for b in bars] == ["fastlm", "hf_eager"]
    assert bars[0].patches[0].get_height() == pytest.approx(256 / 0.310)  # the median call's tok/s
    assert len(ax.lines) >= 2  # the min-max error bars are drawn
    assert any("torch_compile" in t.get_text() for t in fig.texts)  # the provider not run is named


def test_gpu_generate_shapes_one_per_series_are_categories_named_by_shape():
    labels = ["GPT-2 small B1 prompt64 new64", "GPT-2 small B8 prompt960 new64", "GPT-2 medium B1 prompt960 new64"]
    rows = [_row("gpt2_generate", lab, p, x, [5.0 + i, 6.0 + i], work=64, x_name="prompt length (tokens)")
            for i, (lab, x) in enumerate(zip(labels, (64, 960, 960), strict=True)) for p in ("fastlm", "hf_generate")]
    assert plots.is_categorical(rows)
    ax = plots.case_figure(_result(rows), "gpt2_generate", rows).axes[0]
    assert _tick_labels(ax) == labels and ax.get_ylim()[0] == 0


def test_a_swept_case_is_ticked_at_the_measured_values_and_labelled_with_what_varied():
    rows = [_row("attention", f"B2 H4 S{s} D64{c}", p, s, [0.1 * s / 64, 0.12 * s / 64], unit="TFLOP/s",
                 work=4 * 2 * 4 * s * s * 64 / 1e12, x_name="sequence length (S)")
            for c in ("", " causal") for s in (64, 256) for p in ("fastlm", "eager")]
    ax = plots.case_figure(_result(rows), "attention", rows).axes[0]
    assert list(ax.get_xticks()) == [64, 256] and _tick_labels(ax) == ["64", "256"]
    assert ax.get_xlabel() == "sequence length (S)" and ax.get_ylim()[0] == 0
    assert ax.get_ylabel().startswith("GFLOP/s")  # CPU values under 1 TFLOP/s read in GFLOP/s
    rows = [_row("ffn_decode", f"M{m} d768 d_ff3072", "fastlm", m, [1.0, 1.1], unit="GB/s", work=19e6 / 1e9,
                 x_name="rows (M)") for m in (1, 16)]
    assert plots.case_figure(_result(rows), "ffn_decode", rows).axes[0].get_xlabel() == "rows (M)"


def test_the_int8_case_names_its_own_dtype_and_counts_each_providers_bytes():
    case = ffn_int8_cases("cpu", torch.float32)[0]
    assert "int8 weights, float32 activations" in case.dtype
    assert case.bytes_by["fastlm"] == case.bytes_by["torch"] == 4 * case.bytes  # fp32 weights: 4x the int8 bytes
    fake = Case(case.name, "ops", case.label, case.x, {p: (lambda: (lambda: sum(range(100)))) for p in case.providers},
                bytes=case.bytes, bytes_by=case.bytes_by, unit="GB/s", x_name=case.x_name, dtype=case.dtype)
    rows = runner.run_case(fake, "cpu", _result([]).ceilings, 0.001)
    by = {r.provider: r for r in rows}
    assert all(r.dtype == case.dtype and r.status == "ok" for r in rows)
    # the same time gives the fp32 provider 4x the int8 provider's GB/s per ms
    assert by["fastlm"].value * by["fastlm"].ms == pytest.approx(4 * by["fastlm_int8"].value * by["fastlm_int8"].ms)
    title = plots.case_figure(_result(rows), case.name, rows).axes[0].get_title()
    assert "int8 weights" in title and not re.search(r"ffn_decode_int8, float32,", title)


def test_peers_bars_start_at_zero_and_name_the_engines_not_run():
    rows = [Row(c, LABELS[WORKS[c]], p, unit=UNITS[WORKS[c]], ms=10.0 + i, value=10.0 + i, ms_min=10.0 + i,
                ms_max=12.0 + i, n=3) if name != "ctranslate2" else
            Row(c, LABELS[WORKS[c]], p, unit=UNITS[WORKS[c]], status="skipped: ctranslate2 is not installed")
            for c in PEER_CASES for i, (p, name, _) in enumerate(providers())]
    skipped = [{"engine": "CTranslate2", "why": "ctranslate2 is not installed", "install": INSTALL}]
    fig = plots.peers_figure(rows, 40.0, "t", skipped)
    assert all(ax.get_xlim()[0] == 0 for ax in fig.axes)
    assert any("CTranslate2" in t.get_text() and INSTALL in t.get_text() for t in fig.texts)


# -- units, ceilings, spread -----------------------------------------------------------------

def test_values_read_in_a_unit_that_shows_them():
    assert format_value(0.0412, "TFLOP/s") == "41.2 GFLOP/s"
    assert format_value(4.12e-5, "TFLOP/s") == "41.2 MFLOP/s"
    assert format_value(312.4, "TFLOP/s") == "312 TFLOP/s"
    assert format_value(0.5, "GB/s") == "500 MB/s" and format_value(32.94, "GB/s") == "32.9 GB/s"
    assert format_value(803.4, "tok/s") == "803 tok/s" and format_value(2.345, "ms/token") == "2.35 ms/token"
    row = _row("linear_prefill", "M32 768->3072", "fastlm", 32, [2.0, 2.1, 2.2], unit="TFLOP/s",
               work=2 * 32 * 768 * 3072 / 1e12)
    md = report.markdown(_result([row]))
    assert "71.9 GFLOP/s" in md and "0.0 TFLOP/s" not in md and "0.1 TFLOP/s" not in md


def test_no_percent_of_a_ceiling_that_does_not_bound_the_row():
    c = Ceilings(copy_gbs=30.0, matmul_tflops=0.25, matmul_dtype="float32", cache_bytes=32 << 20)
    small = Case("softmax", "ops", "R256 N1024", 1024, {}, bytes=2 << 20, unit="GB/s")
    pct, why = runner.ceiling_pct(small, "torch", 70.0, c)
    assert pct is None and "last-level cache" in why  # served from cache: DRAM bandwidth bounds nothing
    big = Case("decode_attention", "ops", "B8 H12 ctx32768 D64", 32768, {}, bytes=1 << 30, unit="GB/s")
    assert runner.ceiling_pct(big, "fastlm", 24.0, c) == (pytest.approx(80.0), None)
    pct, why = runner.ceiling_pct(big, "fastlm", 176.1, c)
    assert pct is None and "above the measured DRAM copy" in why
    mm = Case("ffn_prefill", "ops", "M256", 256, {}, flops=1e9, unit="TFLOP/s")
    assert runner.ceiling_pct(mm, "fastlm", 0.3, c)[0] is None and runner.ceiling_pct(mm, "x", 0.2, c)[0] == 80.0
    # end to end: a fast call over a claimed 8 GiB is far above the ceiling; an old JSON row said 587%
    fake = Case("layer_norm", "ops", "R512 N768", 768, {"fastlm": lambda: (lambda: None)}, bytes=8 << 30, unit="GB/s")
    rows = runner.run_case(fake, "cpu", c, 0.001)
    assert rows[0].value > 30 and rows[0].pct_of_ceiling is None and rows[0].pct_note
    old = Row("decode_attention", "B1 H12 ctx1024 D64", "sdpa", ms=0.09, value=176.1, unit="GB/s", pct_of_ceiling=587.0)
    md = report.markdown(_result([*rows, old]))
    assert "n/a [1]" in md and "1. " in md and "above the measured DRAM copy" in md
    assert not [p for p in re.findall(r"(\d+)%", md) if int(p) > 100]


def test_timing_keeps_every_call_and_rows_json_and_markdown_carry_the_spread(tmp_path):
    t = Timing.of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.min, t.q1, t.median, t.q3, t.max, t.n) == (1.0, 2.0, 3.0, 4.0, 5.0, 5)
    assert Timing.of([2.5]) == Timing(2.5, 2.5, 2.5, 2.5, 2.5, 1)
    t = timing(lambda: sum(range(1000)), "cpu", 0.005)
    assert t.n >= 3 and t.min <= t.q1 <= t.median <= t.q3 <= t.max
    case = Case("softmax", "ops", "R4 N8", 8, {"torch": lambda: (lambda: torch.softmax(torch.randn(4, 8), -1))},
                bytes=256, unit="GB/s")
    (row,) = runner.run_case(case, "cpu", _result([]).ceilings, 0.002)
    assert row.n >= 3 and row.ms_min <= row.ms_q1 <= row.ms <= row.ms_q3 <= row.ms_max
    save_json(_result([row]), str(tmp_path / "r.json"))
    saved = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert saved["ms_min"] == row.ms_min and saved["ms_max"] == row.ms_max and saved["n"] == row.n
    fixed = _row("softmax", "R4 N8", "torch", 8, [1.0, 2.0, 3.0, 4.0, 5.0], unit="GB/s", work=1e-6)
    md = report.markdown(_result([fixed]))
    assert "| min / max ms | IQR ms | n |" in md and "| 3.000 | 1.000 / 5.000 | 2.000 - 4.000 | 5 |" in md


def test_an_old_json_without_the_spread_still_compares(tmp_path):
    old = {"env": {}, "rows": [{"case": "attention", "label": "S64", "provider": "fastlm", "ms": 1.0, "unit": "ms"}]}
    new = {"env": {}, "rows": [{**old["rows"][0], "ms": 1.5, "ms_min": 1.4, "ms_max": 1.7, "n": 9}]}
    for name, data in (("old.json", old), ("new.json", new)):
        (tmp_path / name).write_text(json.dumps(data))
    assert main(["bench", "--compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1  # 1.5x slower
    assert report.spread(Row(**old["rows"][0])) == ("-", "-", "-")


# -- peers not run, bad --compare input, atomic files ------------------------------------------

@pytest.fixture
def no_ct2(monkeypatch):
    """CTranslate2 as if not installed; the suite's workers faked (no model is run)."""
    why = f"ctranslate2 is not installed ({INSTALL})"
    monkeypatch.setattr(ctranslate2_engine.ENGINE, "missing", lambda: why)
    monkeypatch.setattr(runner, "measure_ceilings",
                        lambda device, dtype=None: Ceilings(30.0, 0.25, "float32", cache_bytes=32 << 20))

    def fake_peers(works, rounds, calls, threads, progress):
        return [Row(c, LABELS[WORKS[c]], p, unit=UNITS[WORKS[c]],
                    **({"status": f"skipped: {why}"} if name == "ctranslate2" else {"ms": 9.0, "value": 9.0}))
                for c in works for p, name, _ in providers()], 40.0
    monkeypatch.setattr(runner, "run_peers", fake_peers)


def test_a_peers_run_without_ctranslate2_names_it_and_its_install_command(no_ct2, tmp_path, capsys):
    assert main(["bench", "--suite", "peers", "--device", "cpu", "--out", str(tmp_path), "--no-plots"]) == 0
    line = f"CTranslate2 was not run: ctranslate2 is not installed. Install it with: {INSTALL}"
    assert line in capsys.readouterr().out
    md = (tmp_path / "bench-cpu.md").read_text()
    assert "## Peer engines not run" in md and f"- {line}" in md


def test_a_plain_run_that_skips_the_peers_says_why_and_how_to_install(no_ct2, monkeypatch):
    monkeypatch.setattr(runner, "build_cases", lambda *a: [])
    res = runner.run("cpu", torch.float32, "all")
    assert not [r for r in res.rows if r.case in PEER_CASES]  # a plain `fastlm bench` stays short ...
    md = report.markdown(res)  # ... and says so
    assert "The peers suite did not run: they run apart" in md and "fastlm bench --suite peers" in md
    assert "CTranslate2 was not run: ctranslate2 is not installed" in md and INSTALL in md  # and what is missing


@pytest.mark.parametrize("content", [b"{oops", b"[1, 2]", b'"text"', b'{"rows": 3}', b'{"env": {}}',
                                     b'{"rows": [7]}', b'{"rows": [{"case": "a", "label": "b"}]}',
                                     b'{"rows": [{"case": "a", "label": "b", "provider": "c", "ms": "fast"}]}',
                                     b"\x89PNG\r\n\x1a\n\x00\xff", b""])
def test_compare_on_a_file_that_is_not_a_bench_result_is_one_line_and_exit_2(tmp_path, capsys, content):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"rows": [{"case": "a", "label": "b", "provider": "c", "ms": 1.0}]}))
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    for args in ((bad, good), (good, bad)):
        assert main(["bench", "--compare", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"fastlm bench: --compare: {bad} is not a fastlm bench result: ")
    with pytest.raises(ValueError, match="is not a fastlm bench result"):
        load_json(str(bad))
    assert load_json(str(good))["rows"][0]["ms"] == 1.0


def test_ctrl_c_while_writing_leaves_no_half_written_file(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run", lambda *a, **k: _result([_row("softmax", "R4 N8", "torch", 8, [1.0, 2.0])]))
    (tmp_path / "bench-cpu.md").write_text("the previous run\n")
    real_replace = os.replace

    def interrupted(src, dst):  # Ctrl-C after the bytes are written, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(textio.os, "replace", interrupted)
    assert main(["bench", "--only", "softmax", "--device", "cpu", "--out", str(tmp_path)]) == 130
    assert sorted(os.listdir(tmp_path)) == ["bench-cpu.md"]  # no JSON, no temporary file
    assert (tmp_path / "bench-cpu.md").read_text() == "the previous run\n"
    monkeypatch.setattr(textio.os, "replace", real_replace)
    # a plot interrupted half-way through its bytes: no PNG, no temporary file
    res = _result([_row("softmax", "R4 N8", "torch", 8, [1.0, 2.0])])

    def half_png(self, f, **kw):
        f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", half_png)
    with pytest.raises(KeyboardInterrupt):
        plots.plot(res, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["bench-cpu.md"]


def _bench_file(path, rows):
    path.write_text(json.dumps({"env": {}, "rows": rows}))
    return str(path)


def test_compare_counts_a_case_that_now_fails_as_a_regression(tmp_path, capsys):
    """A row measured in OLD whose provider fails in NEW (status "failed: ...", no ms) is the worst
    regression: --compare must say so and exit 1, not drop the row and report "no regressions"."""
    ok = {"case": "attention", "label": "S64", "provider": "fastlm", "ms": 1.0, "status": "ok"}
    old = _bench_file(tmp_path / "old.json", [ok, {**ok, "provider": "torch"}])
    new = _bench_file(tmp_path / "new.json", [{**ok, "ms": None, "status": "failed: RuntimeError: boom"},
                                              {**ok, "provider": "torch"}])
    assert main(["bench", "--compare", old, new]) == 1
    out = capsys.readouterr().out
    assert "failed: RuntimeError: boom" in out and "1 regression" in out
    rows = report.compare(load_json(old), load_json(new))
    assert [(r["provider"], r["regression"]) for r in rows] == [("fastlm", True), ("torch", False)]


def test_compare_with_no_row_in_common_is_an_error_not_a_pass(tmp_path, capsys):
    """Two results that share no (case, shape, provider) (a CPU file against a GPU one, another
    suite) compare nothing: one line and exit 2, not an empty table and "no regressions"."""
    old = _bench_file(tmp_path / "old.json", [{"case": "attention", "label": "S64", "provider": "fastlm", "ms": 1.0}])
    new = _bench_file(tmp_path / "new.json", [{"case": "softmax", "label": "R4", "provider": "fastlm", "ms": 9.0}])
    assert main(["bench", "--compare", old, new]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no (case, shape, provider) measured in both" in err


def test_compare_refuses_a_non_finite_time(tmp_path):
    bad = _bench_file(tmp_path / "nan.json", [{"case": "a", "label": "b", "provider": "c", "ms": float("nan")}])
    with pytest.raises(ValueError, match="not a fastlm bench result: row 0's \"ms\" is nan"):
        load_json(bad)
