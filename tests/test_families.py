"""Every supported architecture against transformers on padded batches (right and left padding),
random weights (every parameter randomised, tiny configs), fp32: through from_pretrained from a
save_pretrained directory, from the model object, and through fastlm.optimize."""

import logging

import pytest
import torch
import transformers as tf
from conftest import randomize_

import fastlm
from fastlm.testing import max_err

ATOL = 1e-4
V, S = 101, 16
ENC = dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=80, vocab_size=V,
           max_position_embeddings=40)
CONFIGS = {
    "Bert": lambda: tf.BertConfig(**ENC, type_vocab_size=3),
    "Roberta": lambda: tf.RobertaConfig(**ENC, pad_token_id=1),
    "XLMRoberta": lambda: tf.XLMRobertaConfig(**ENC, pad_token_id=1),
    "Camembert": lambda: tf.CamembertConfig(**ENC, pad_token_id=1),
    "DistilBert": lambda: tf.DistilBertConfig(dim=48, n_heads=3, n_layers=2, hidden_dim=80, vocab_size=V,
                                              max_position_embeddings=40, pad_token_id=0),
    "GPT2": lambda: tf.GPT2Config(n_layer=2, n_head=3, n_embd=48, vocab_size=V, n_positions=40, pad_token_id=0,
                                  bos_token_id=0, eos_token_id=0),
}
TASKS = ["Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM"]
CLASSES = [f + t for f in CONFIGS if f != "GPT2" for t in TASKS]
CLASSES += ["GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification"]


def family(name):
    return next(f for f in sorted(CONFIGS, key=len, reverse=True) if name.startswith(f))


def padded_batch(pad_id, left, token_types=0, seed=0):
    """(ids, mask, token_type_ids or None) of 3 rows: full, padded by 7, padded by 13; padded
    positions hold the pad id, as a tokenizer writes them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (3, S), generator=g)
    mask = torch.ones(3, S, dtype=torch.long)
    for row, n in ((1, 7), (2, 13)):
        if left:
            mask[row, :n] = 0
        else:
            mask[row, S - n:] = 0
    ids[mask == 0] = pad_id
    tt = torch.randint(0, token_types, (3, S), generator=g) if token_types else None
    return ids, mask, tt


def hf_model(name, **cfg_kw):
    cfg = CONFIGS[family(name)]()
    for k, v in cfg_kw.items():
        setattr(cfg, k, v)
    return randomize_(getattr(tf, name)(cfg).eval())


def call(model, ids, mask, tt):
    kw = {} if tt is None else {"token_type_ids": tt}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw)


def readable(mask, name):
    """Positions transformers defines: real tokens, and position 0 of an encoder (its pooler and
    classification heads read it even where it is padding)."""
    vis = mask.bool().clone()
    if not name.startswith("GPT2"):
        vis[:, 0] = True
    return vis


def assert_matches(got, expect, mask, name, what):
    keys = [k for k in expect.keys() if isinstance(expect[k], torch.Tensor)]
    assert [k for k in got.keys() if isinstance(got[k], torch.Tensor)] == keys, (what, list(got.keys()), keys)
    vis = readable(mask, name)
    for k in keys:
        a, b = got[k], expect[k]
        assert a.shape == b.shape, (what, k)
        if a.dim() >= 2 and a.shape[:2] == mask.shape:  # per-token outputs
            a, b = a[vis], b[vis]
        err = max_err(a, b)
        assert err <= ATOL, f"{what}: {k} differs by {err:.3g}"


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
@pytest.mark.parametrize("name", CLASSES)
def test_from_pretrained_and_optimize_match_transformers(name, left, tmp_path):
    hf = hf_model(name)
    pad = hf.config.pad_token_id
    ids, mask, tt = padded_batch(pad, left, token_types=3 if name.startswith("Bert") else 0)
    expect = call(hf, ids, mask, tt)
    assert expect[0].abs().max() > 0.1 and expect[0].std() > 0.05  # a non-trivial reference
    hf.save_pretrained(tmp_path)
    from_dir = fastlm.from_pretrained(tmp_path)  # the class follows config.architectures
    from_obj = fastlm.from_pretrained(hf)  # the class follows the object
    for model, what in ((from_dir, "directory"), (from_obj, "object")):
        assert type(model).__name__ == name
        got = call(model, ids, mask, tt)
        assert_matches(got, expect, mask, name, what)
        assert torch.equal(got[0], got.to_tuple()[0])
    fastlm.optimize(hf)
    assert_matches(call(hf, ids, mask, tt), expect, mask, name, "optimize")


@pytest.mark.parametrize("name", ["BertModel", "RobertaModel", "DistilBertModel"])
def test_padded_positions_are_zero_except_position_0(name):
    """Documented: last_hidden_state is 0 at padded positions other than position 0."""
    hf = hf_model(name)
    model = fastlm.from_pretrained(hf)
    for left in (False, True):
        ids, mask, _ = padded_batch(hf.config.pad_token_id, left)
        h = model(ids, mask).last_hidden_state
        pad = ~mask.bool()
        pad[:, 0] = False
        assert pad.any() and h[pad].abs().max() == 0
        assert h[readable(mask, name)].abs().min() > 0


def test_output_records_index_like_transformers():
    hf = hf_model("BertForQuestionAnswering")
    ids, mask, _ = padded_batch(0, False)
    out = fastlm.from_pretrained(hf)(ids, mask)
    ref = call(hf, ids, mask, None)
    assert list(out.keys()) == ["start_logits", "end_logits"] == [k for k in ref.keys()]
    start, end = out.to_tuple()
    assert out[0] is out.start_logits is start and out[1] is out["end_logits"] is end and len(out) == 2
    base = fastlm.from_pretrained(hf_model("DistilBertModel"))(ids, mask)
    assert base.pooler_output is None and list(base.keys()) == ["last_hidden_state"] and len(base.to_tuple()) == 1
    with pytest.raises(KeyError):
        base["pooler_output"]


def test_gpt2_sequence_classification_reads_the_last_non_pad_token():
    hf = hf_model("GPT2ForSequenceClassification")
    ids, mask, _ = padded_batch(0, False)
    ids[0, 5] = 0  # a pad id inside a real row: transformers takes the rightmost non-pad token anyway
    model = fastlm.from_pretrained(hf)
    assert max_err(model(ids, mask).logits, call(hf, ids, mask, None).logits) <= ATOL
    hf.config.pad_token_id = model.config.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id"):
        model(ids, mask)
    one = ids[:1]
    assert max_err(model(one).logits, call(hf, one, None, None).logits) <= ATOL  # batch 1: the last token


def test_sequence_classification_config_labels():
    """num_labels / id2label / problem_type come from the config as in transformers (at inference
    problem_type changes nothing: it only picks transformers' loss)."""
    for kw in (dict(num_labels=1, problem_type="regression"),
               dict(id2label={0: "neg", 1: "neu", 2: "pos"}, problem_type="multi_label_classification")):
        hf = hf_model("RobertaForSequenceClassification", **kw)
        ids, mask, _ = padded_batch(1, True)
        model = fastlm.from_pretrained(hf)
        assert model.config.num_labels == hf.config.num_labels and model.config.id2label == hf.config.id2label
        assert max_err(model(ids, mask).logits, call(hf, ids, mask, None).logits) <= ATOL


def test_unsupported_architectures_name_the_supported_ones(tmp_path):
    hf = randomize_(tf.BertForPreTraining(CONFIGS["Bert"]()).eval())
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"BertForPreTraining.*supported architectures: BertModel, .*GPT2Model"):
        fastlm.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="supported architectures: BertModel"):
        fastlm.from_pretrained(hf)
    with pytest.raises(ValueError, match="head must be one of BertModel"):
        fastlm.from_pretrained(tmp_path, head="BertForNextSentencePrediction")
    with pytest.raises(ValueError, match="RobertaForMaskedLM cannot load a 'bert' checkpoint"):
        fastlm.from_pretrained(tmp_path, head="RobertaForMaskedLM")


# -- issue 12.1: a checkpoint saved from any head class loads into any compatible model --------

def test_pretraining_checkpoint_loads_into_every_head(tmp_path, caplog):
    hf = randomize_(tf.BertForPreTraining(CONFIGS["Bert"]()).eval())
    hf.save_pretrained(tmp_path)
    ids, mask, _ = padded_batch(0, True)
    with torch.no_grad():
        base = hf.bert(input_ids=ids, attention_mask=mask)
        mlm = hf(input_ids=ids, attention_mask=mask).prediction_logits
    vis = readable(mask, "Bert")
    with caplog.at_level(logging.INFO, logger="fastlm"):
        model = fastlm.from_pretrained(tmp_path, head="BertForMaskedLM")
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "cls.seq_relationship.weight" in skipped[0] and "pooler.dense.weight" in skipped[0]
    assert max_err(model(ids, mask).logits[vis], mlm[vis]) <= ATOL

    model = fastlm.from_pretrained(tmp_path, head="BertModel")
    out = model(ids, mask)
    assert max_err(out.last_hidden_state[vis], base.last_hidden_state[vis]) <= ATOL
    assert max_err(out.pooler_output, base.pooler_output) <= ATOL

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        model = fastlm.from_pretrained(tmp_path, head="BertForSequenceClassification")
    warned = [r.getMessage() for r in caplog.records if "newly initialised" in r.getMessage()]
    assert len(warned) == 1 and "classifier.weight, classifier.bias" in warned[0]
    w = model.classifier.weight  # transformers' init: normal(0, initializer_range), bias 0
    assert abs(w.std().item() - hf.config.initializer_range) < 0.01 and model.classifier.bias.abs().max() == 0
    # the base is the checkpoint's: logits = classifier(pooler), with the checkpoint's pooler
    pooled = model.bert(ids, mask).pooler_output
    assert max_err(pooled, base.pooler_output) <= ATOL
    assert max_err(model(ids, mask).logits, pooled @ w.t()) <= 1e-5


def test_base_checkpoint_loads_into_head_models(tmp_path, caplog):
    """A RobertaModel checkpoint (no `roberta.` prefix) into RobertaForTokenClassification: the
    base weights are found, the classifier is newly initialised with one warning."""
    hf = hf_model("RobertaModel")
    hf.save_pretrained(tmp_path)
    ids, mask, _ = padded_batch(1, False)
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        model = fastlm.from_pretrained(tmp_path, head="RobertaForTokenClassification")
    assert any("classifier.weight" in r.getMessage() for r in caplog.records)
    h = model.roberta(ids, mask).last_hidden_state
    ref = call(hf, ids, mask, None).last_hidden_state
    vis = readable(mask, "Roberta")
    assert max_err(h[vis], ref[vis]) <= ATOL


def test_legacy_names_and_sharded_checkpoints(tmp_path):
    """LayerNorm.gamma/beta (old BERT checkpoints), GPT-2's attn.bias / attn.masked_bias buffers,
    and sharded safetensors / .bin indexes."""
    import json

    from safetensors.torch import load_file

    hf = hf_model("BertForSequenceClassification")
    ids, mask, _ = padded_batch(0, True)
    expect = call(hf, ids, mask, None).logits
    hf.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    assert max_err(fastlm.from_pretrained(tmp_path / "s")(ids, mask).logits, expect) <= ATOL
    # the same shards as legacy .bin files with gamma/beta names
    (tmp_path / "b").mkdir()
    hf.config.save_pretrained(tmp_path / "b")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    wmap = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in load_file(tmp_path / "s" / shard).items()}
        name = shard.replace(".safetensors", ".bin")
        torch.save(sd, tmp_path / "b" / name)
        wmap.update({k: name for k in sd})
    (tmp_path / "b" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    assert any("gamma" in k for k in wmap)
    assert max_err(fastlm.from_pretrained(tmp_path / "b")(ids, mask).logits, expect) <= ATOL
    # GPT-2 with the old causal-mask buffers in the checkpoint
    g = hf_model("GPT2LMHeadModel")
    sd = dict(g.state_dict())
    for i in range(g.config.n_layer):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 40, 40))
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "g").mkdir()
    g.config.save_pretrained(tmp_path / "g")
    torch.save(sd, tmp_path / "g" / "pytorch_model.bin")
    gids, gmask, _ = padded_batch(0, False)
    vis = gmask.bool()
    ref = call(g, gids, gmask, None).logits
    assert max_err(fastlm.from_pretrained(tmp_path / "g")(gids, gmask).logits[vis], ref[vis]) <= ATOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_left_padded_encoder_on_the_triton_kernels(device, dtype):
    """Position 0 of left-padded rows (a one-query attention over the row's real keys, strided
    views of the fused QKV) on the Triton kernels (interpreter on CPU)."""
    hf = hf_model("RobertaForSequenceClassification")
    ids, mask, _ = padded_batch(1, True)
    expect = call(hf, ids, mask, None).logits
    model = fastlm.from_pretrained(hf, dtype=dtype, device=device)
    with fastlm.use_backend("triton"):
        got = model(ids.to(device), mask.to(device)).logits.float().cpu()
    tol = ATOL if dtype == torch.float32 else 5e-3 * expect.abs().max().item()
    assert max_err(got, expect) <= tol


def test_right_padding_adds_no_work():
    """The exact position-0 fix costs nothing in the common right-padded case: no extra queries;
    under left padding exactly the rows whose position 0 is padding get one."""
    from fastlm.models.bert import _unpad

    _, right, _ = padded_batch(0, False)
    idx, rows, cu, max_len, ghosts = _unpad(right.bool())
    assert ghosts is None and rows.numel() == 0 and idx.numel() == int(right.sum()) and max_len == S
    _, left, _ = padded_batch(0, True)
    idx, rows, cu, max_len, ghosts = _unpad(left.bool())
    assert rows.tolist() == [1, 2] and ghosts.keep.sum(1).tolist() == [S - 7, S - 13]
    assert cu.tolist() == [0, S, 2 * S - 7, 3 * S - 20]
