"""Issue 12.2: GPT-2's LM head is tied by what the checkpoint holds, as transformers does: a tied
config whose checkpoint stores a different lm_head.weight uses the stored head (one warning); an
equal or absent one stays tied; an untied config without lm_head.weight is a WeightError."""

import logging

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import fastlm
from fastlm.testing import max_err

CFG = {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 211, "n_positions": 32, "initializer_range": 0.4}


def head_weight(model) -> torch.Tensor:
    """The LM head's (vocab, C) weight; on CPU fp32 the head is a PackedLinear (its own packed copy)."""
    head = model.lm_head
    return head.dense_weight() if hasattr(head, "dense_weight") else head.weight


def checkpoint(path, tie=True, head="differs"):
    """A GPT-2 directory saved by transformers; its safetensors then get lm_head.weight as `head`
    says: "differs" (a fresh random matrix), "equal" (a copy of wte), "absent" (removed)."""
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(**CFG, tie_word_embeddings=tie)).eval()
    hf.save_pretrained(path)
    f = path / "model.safetensors"
    sd = load_file(f)
    wte = sd["transformer.wte.weight"]
    if head == "differs":
        sd["lm_head.weight"] = torch.randn_like(wte)
    elif head == "equal":
        sd["lm_head.weight"] = wte.clone()
    else:
        sd.pop("lm_head.weight", None)
    save_file(sd, f, metadata={"format": "pt"})
    return sd


def hf_logits(path, ids, mask):
    hf = tf.GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits, hf


def inputs():
    ids = torch.randint(0, CFG["vocab_size"], (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def tie_warnings(caplog):
    return [r for r in caplog.records if r.name == "fastlm" and "lm_head" in r.getMessage()]


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_tied_config_with_a_different_stored_head_unties_like_transformers(tmp_path, caplog, backend):
    sd = checkpoint(tmp_path, tie=True, head="differs")
    ids, mask = inputs()
    expect, hf = hf_logits(tmp_path, ids, mask)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()  # transformers unties
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        model = fastlm.from_pretrained(tmp_path)
    assert len(tie_warnings(caplog)) == 1, "say once that the stored head is used"
    assert "differs from wte.weight" in tie_warnings(caplog)[0].getMessage()
    assert not model.tied
    assert torch.equal(head_weight(model), sd["lm_head.weight"])
    assert torch.equal(model.wte.weight, sd["transformer.wte.weight"])
    with fastlm.use_backend(backend):
        got = model(ids, mask).logits
    keep = mask.bool()
    assert max_err(got[keep], expect[keep]) < 1e-4
    # the tied model's logits are far off, so this test tells the two apart
    with torch.no_grad():
        h = hf.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    tied = torch.nn.functional.linear(h, sd["transformer.wte.weight"])
    assert max_err(tied[keep], expect[keep]) > 1


@pytest.mark.parametrize("head", ["equal", "absent"])
def test_tied_config_with_an_equal_or_absent_head_stays_tied(tmp_path, caplog, head):
    checkpoint(tmp_path, tie=True, head=head)
    ids, mask = inputs()
    expect, _ = hf_logits(tmp_path, ids, mask)
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        model = fastlm.from_pretrained(tmp_path)
    assert not tie_warnings(caplog)
    assert model.tied and torch.equal(head_weight(model), model.wte.weight)
    keep = mask.bool()
    assert max_err(model(ids, mask).logits[keep], expect[keep]) < 1e-4


def test_untied_config_with_its_head_loads_it(tmp_path):
    sd = checkpoint(tmp_path, tie=False, head="differs")
    ids, mask = inputs()
    expect, _ = hf_logits(tmp_path, ids, mask)
    model = fastlm.from_pretrained(tmp_path)
    assert not model.tied and torch.equal(head_weight(model), sd["lm_head.weight"])
    keep = mask.bool()
    assert max_err(model(ids, mask).logits[keep], expect[keep]) < 1e-4


def test_untied_config_without_a_head_is_a_weight_error(tmp_path):
    # transformers initialises the missing head at random; fastlm refuses, naming it
    checkpoint(tmp_path, tie=False, head="absent")
    with pytest.raises(fastlm.WeightError, match=r"missing \(1\): lm_head.weight"):
        fastlm.from_pretrained(tmp_path)


def test_model_object_with_an_untied_head_under_a_tied_config(caplog):
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(**CFG)).eval()
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight))
    ids, mask = inputs()
    with torch.no_grad():
        expect = hf(input_ids=ids, attention_mask=mask).logits
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        model = fastlm.from_pretrained(hf)
    assert len(tie_warnings(caplog)) == 1 and not model.tied
    keep = mask.bool()
    assert max_err(model(ids, mask).logits[keep], expect[keep]) < 1e-4
