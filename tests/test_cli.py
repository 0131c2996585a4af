"""The fastlm command line: info, bench (with bad names), generate, --compare.

Device-aware: the benchmark mechanics (JSON, table, plots, `pytest bench/`) are checked on the
CPU cases on every machine (`--device cpu`, FASTLM_BENCH_DEVICE=cpu), so on a GPU machine these
tests stay seconds long instead of running the full GPU suite with its torch.compile baselines
(bench/device_check.sh benchmarks the GPU itself, with its own time limits)."""

import json
import os
import subprocess
import sys

from fastlm.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastlm", *args], capture_output=True, text=True, timeout=300)


def test_info_reports_extension_and_ops(capsys):
    assert main(["info", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["fastlm._C"] == "loaded"
    assert {r["op"] for r in rep["ops"]} >= {"attention", "softmax", "decode_attention", "bias_gelu", "ffn"}


def test_bench_writes_json_table_and_plots(tmp_path):
    res = run("bench", "--only", "attention", "--device", "cpu", "--budget", "0.05", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "CPU figures" in res.stdout and "fastlm" in res.stdout
    data = json.loads(next(tmp_path.glob("bench-cpu-*.json")).read_text())
    assert data["ceilings"]["copy_gbs"] > 0 and data["env"]["torch"]
    assert any(r["provider"] == "fastlm" and r["ms"] for r in data["rows"])
    assert (tmp_path / "attention_cpu.png").stat().st_size > 10_000
    assert not list(tmp_path.glob("bench-cuda*"))  # --device cpu, on a GPU machine too
    assert (tmp_path / "bench-cpu.md").read_text().startswith("# fastlm bench")
    # comparing a run with itself finds no regression
    f = str(next(tmp_path.glob("bench-cpu-*.json")))
    assert main(["bench", "--compare", f, f]) == 0


def test_bench_bad_names_list_the_valid_ones(capsys):
    assert main(["bench", "--suite", "everything"]) == 2
    assert "ops, models, all" in capsys.readouterr().err
    assert main(["bench", "--only", "nope"]) == 2
    assert "attention" in capsys.readouterr().err
    assert main(["bench", "--compare", "/nonexistent/a.json", "/nonexistent/b.json"]) == 2


def test_bench_serve_bad_options_are_one_line(capsys, tmp_path):
    """Checked before any server starts: a usage error (exit 2) naming the option, no file written."""
    for args, msg in ((["--soak-requests", "-3"], "--soak-requests must be >= 0, got -3"),
                      (["--name", ""], "--name must be a plain file name"),
                      (["--name", "a/b"], "--name must be a plain file name"),
                      (["--name", ".."], "--name must be a plain file name")):
        assert main(["bench", "--suite", "serve", "--out", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_generate_random_config(capsys):
    """On the machine's device (a GPU where there is one: the CUDA-graph decode runs)."""
    assert main(["generate", "--config", "gpt2-tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "time to first token" in out and "ms/token" in out
    assert main(["generate", "--config", "gpt2-tiny", "--prompt-len", "2000", "--max-new-tokens", "5"]) == 2
    assert "1024 positions" in capsys.readouterr().err
    assert main(["generate", "--config", "gpt5"]) == 2


def test_generate_quantized(capsys):
    args = ["generate", "--config", "gpt2-tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--device", "cpu"]
    assert main([*args, "--quantize", "int8"]) == 0
    assert "ms/token" in capsys.readouterr().out
    assert main([*args, "--quantize", "int4"]) == 2
    assert "'int8', 'int8_dynamic'" in capsys.readouterr().err


def test_fastlm_works_without_the_extension():
    """fastlm._C missing (not built, or built for another torch): import works, ops run the
    reference path, and `fastlm info` says so."""
    code = (
        "import sys; sys.modules['fastlm._C'] = None\n"
        "import torch, fastlm\n"
        "from fastlm import ops, _ext\n"
        "assert not _ext.available() and 'fastlm._C' in _ext.LOAD_ERROR\n"
        "x, b = torch.randn(3, 8), torch.randn(8)\n"
        "with fastlm.use_backend('cuda'):\n"
        "    y = ops.bias_gelu(x, b)\n"
        "assert torch.allclose(y, torch.nn.functional.gelu(x + b), atol=1e-6)\n"
        "from fastlm.cli import main\n"
        "main(['info'])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "missing" in res.stdout and "reference" in res.stdout


def test_pytest_benchmark_suite_runs_on_cpu():
    """`pytest bench/` (pytest-benchmark over the same case factories) runs every CPU case once,
    on a GPU machine too (FASTLM_BENCH_DEVICE=cpu)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "FASTLM_BENCH_DEVICE": "cpu"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          os.path.join(root, "bench")], capture_output=True, text=True, timeout=600, cwd=root,
                         env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout


def test_generate_takes_its_length_from_the_checkpoint(tmp_path, capsys):
    # No --max-new-tokens: the checkpoint's generation_config.json decides (as every other option
    # left unset), not a CLI default of its own.
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=97, n_positions=64)).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7, "eos_token_id": None}))
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1,2,3", "--device", "cpu"]) == 0
    assert " 7 new tokens" in capsys.readouterr().out
