"""fastlm's BERT and GPT-2 against transformers on CPU, random weights, odd configs."""

import json
import os
from unittest import mock

import pytest
import torch
import transformers as tf
from conftest import randomize_
from safetensors.torch import load_file, save_file

import fastlm
from fastlm.testing import max_err

GPT2_CONFIGS = {
    "h3_d32_v101": dict(n_layer=2, n_head=3, n_embd=96, vocab_size=101, n_positions=64),
    "h2_d80_v257": dict(n_layer=1, n_head=2, n_embd=160, vocab_size=257, n_positions=40),
    "h4_d32_untied_invlayer": dict(n_layer=3, n_head=4, n_embd=128, vocab_size=500, n_positions=48,
                                   tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True),
}
BERT_CONFIGS = {
    "h3_d32_v101": dict(num_hidden_layers=2, num_attention_heads=3, hidden_size=96, intermediate_size=200,
                        vocab_size=101),
    "h2_d80_v257": dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=160, intermediate_size=320,
                        vocab_size=257, max_position_embeddings=40),
    "h4_d32_tt3": dict(num_hidden_layers=3, num_attention_heads=4, hidden_size=128, intermediate_size=300,
                       vocab_size=333, type_vocab_size=3),
}
ATOL32 = 1e-4


def hf_gpt2(name):
    return randomize_(tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2_CONFIGS[name], bos_token_id=0, eos_token_id=0)).eval())


def hf_bert(name, cls=tf.BertModel, **kw):
    return randomize_(cls(tf.BertConfig(**BERT_CONFIGS[name], **kw)).eval())


def right_padded(B, S, vocab, lengths):
    ids = torch.randint(0, vocab, (B, S))
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return ids, mask


def valid(t, mask):
    return t[mask.bool()]


@pytest.mark.parametrize("name", list(GPT2_CONFIGS))
def test_gpt2_fp32_matches_transformers(name):
    hf = hf_gpt2(name)
    model = fastlm.from_pretrained(hf)
    S = min(17, hf.config.n_positions)
    ids, mask = right_padded(3, S, hf.config.vocab_size, [S, 9, 1])
    with torch.no_grad():
        expect = hf(input_ids=ids, attention_mask=mask).logits
    got = model(ids, mask).logits
    assert got.shape == expect.shape
    assert max_err(valid(got, mask), valid(expect, mask)) <= ATOL32
    # and without a mask
    with torch.no_grad():
        expect = hf(input_ids=ids).logits
    assert max_err(model(ids).logits, expect) <= ATOL32


@pytest.mark.parametrize("name", list(BERT_CONFIGS))
def test_bert_fp32_matches_transformers(name):
    hf = hf_bert(name)
    model = fastlm.from_pretrained(hf)
    cfg = hf.config
    ids, mask = right_padded(3, 23, cfg.vocab_size, [23, 11, 2])
    tt = torch.randint(0, cfg.type_vocab_size, ids.shape)
    with torch.no_grad():
        expect = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    got = model(ids, mask, tt)
    assert max_err(valid(got.last_hidden_state, mask), valid(expect.last_hidden_state, mask)) <= ATOL32
    assert max_err(got.pooler_output, expect.pooler_output) <= ATOL32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_2x_of_transformers(dtype):
    hf = hf_gpt2("h3_d32_v101")
    ids, mask = right_padded(2, 17, 101, [17, 8])
    with torch.no_grad():
        ref32 = hf(input_ids=ids, attention_mask=mask).logits
        plain = hf.to(dtype)(input_ids=ids, attention_mask=mask).logits
    got = fastlm.from_pretrained(hf, dtype=dtype)(ids, mask).logits
    assert got.dtype == dtype
    err, base = max_err(valid(got, mask), valid(ref32, mask)), max_err(valid(plain, mask), valid(ref32, mask))
    assert err <= 2 * base + 1e-3 * ref32.abs().max().item(), (err, base)

    hb = hf_bert("h4_d32_tt3")
    with torch.no_grad():
        ref32 = hb(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = hb.to(dtype)(input_ids=ids, attention_mask=mask).last_hidden_state
    got = fastlm.from_pretrained(hb, dtype=dtype)(ids, mask).last_hidden_state
    err, base = max_err(valid(got, mask), valid(ref32, mask)), max_err(valid(plain, mask), valid(ref32, mask))
    assert err <= 2 * base + 1e-3 * ref32.abs().max().item(), (err, base)


def test_bert_heads_match_transformers():
    ids, mask = right_padded(2, 13, 101, [13, 6])
    hf = hf_bert("h3_d32_v101", tf.BertForSequenceClassification, num_labels=5)
    got = fastlm.from_pretrained(hf, head="BertForSequenceClassification")(ids, mask).logits
    with torch.no_grad():
        assert max_err(got, hf(input_ids=ids, attention_mask=mask).logits) <= ATOL32
    hf = hf_bert("h3_d32_v101", tf.BertForMaskedLM)
    model = fastlm.from_pretrained(hf, head="BertForMaskedLM")
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        expect = hf(input_ids=ids, attention_mask=mask).logits
    assert max_err(valid(model(ids, mask).logits, mask), valid(expect, mask)) <= ATOL32


def test_checkpoint_directories(tmp_path):
    hf = hf_gpt2("h2_d80_v257")
    ids = torch.randint(0, 257, (2, 11))
    with torch.no_grad():
        expect = hf(input_ids=ids).logits
    hf.save_pretrained(tmp_path / "safe")
    assert os.path.isfile(tmp_path / "safe" / "model.safetensors")
    assert max_err(fastlm.from_pretrained(tmp_path / "safe")(ids).logits, expect) <= ATOL32
    # .bin, with transformers' "transformer." prefix
    os.makedirs(tmp_path / "bin")
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert max_err(fastlm.from_pretrained(tmp_path / "bin")(ids).logits, expect) <= ATOL32
    # sharded
    hf.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "shards" / "model.safetensors.index.json")
    model = fastlm.from_pretrained(tmp_path / "shards", dtype=torch.bfloat16)
    # bf16 on CPU packs the decode projections as fp32 does: the tied head gets its own (bf16
    # pair-panel) copy of wte, the embedding keeps wte
    assert model.dtype == torch.bfloat16 and model.tied
    assert torch.equal(model.lm_head.dense_weight(), model.wte.weight)
    assert max_err(model(ids).logits.float(), expect) <= 0.05 * expect.abs().max().item()


def test_bert_checkpoint_without_pooler(tmp_path):
    hf = hf_bert("h3_d32_v101", tf.BertForMaskedLM)
    hf.save_pretrained(tmp_path)
    assert isinstance(fastlm.from_pretrained(tmp_path), fastlm.BertForMaskedLM)  # config.architectures
    model = fastlm.from_pretrained(tmp_path, head="BertModel")  # an MLM checkpoint has no pooler
    assert model.pooler is None
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        expect = hf.bert(input_ids=ids).last_hidden_state
    out = model(ids)
    assert out.pooler_output is None and max_err(out.last_hidden_state, expect) <= ATOL32


def test_random_init_from_config():
    cfg = tf.GPT2Config(**GPT2_CONFIGS["h3_d32_v101"])
    model = fastlm.from_pretrained(cfg)
    assert isinstance(model, fastlm.GPT2LMHeadModel)
    assert model.h[0].attn.c_attn.dense_weight().std() > 0.01  # packed for the CPU GEMV
    bert = fastlm.from_pretrained(tf.BertConfig(**BERT_CONFIGS["h3_d32_v101"]), dtype=torch.float16)
    assert isinstance(bert, fastlm.BertModel) and bert.dtype == torch.float16


# -- bad input -----------------------------------------------------------------------------

def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        fastlm.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'.*supports gpt2, bert"):
        fastlm.from_pretrained(tmp_path)
    hf = hf_gpt2("h3_d32_v101")
    hf.save_pretrained(tmp_path / "ok")
    wfile = tmp_path / "ok" / "model.safetensors"
    data = wfile.read_bytes()
    wfile.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not read weights from .*model.safetensors"):
        fastlm.from_pretrained(tmp_path / "ok")
    with pytest.raises(TypeError, match="src must be"):
        fastlm.from_pretrained(42)


def test_weight_errors_are_listed_together(tmp_path):
    hf = hf_gpt2("h3_d32_v101")
    hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    del sd["transformer.h.0.ln_1.weight"]
    sd["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(7)
    sd["transformer.h.9.surprise"] = torch.zeros(3)
    save_file(sd, f)
    with pytest.raises(fastlm.WeightError) as e:
        fastlm.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing (1): h.0.ln_1.weight" in msg
    assert "unexpected (1): h.9.surprise" in msg
    assert "h.1.mlp.c_fc.bias [(7,)] -> h.1.mlp.c_fc.bias expects (384,)" in msg


def test_forward_input_errors():
    model = fastlm.from_pretrained(tf.GPT2Config(**GPT2_CONFIGS["h2_d80_v257"]))
    with pytest.raises(ValueError, match="more than the model's 40 positions"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):  # also a TypeError
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 257\)"):
        model(torch.full((1, 3), 257))
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(torch.zeros(0, 3, dtype=torch.long))
    bert = fastlm.from_pretrained(tf.BertConfig(**BERT_CONFIGS["h3_d32_v101"]))
    with pytest.raises(ValueError, match="token_type_ids must lie in"):
        bert(torch.zeros(1, 3, dtype=torch.long), token_type_ids=torch.full((1, 3), 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_models_on_the_triton_kernels_match_transformers(device, dtype):
    """The same parity with attention on the Triton kernels (interpreter on CPU): GPT-2 with a
    padded batch (key padding mask), BERT with padding (unpadded varlen path) and without."""
    hf = hf_gpt2("h2_d80_v257")
    ids, mask = right_padded(2, 19, 257, [19, 7])
    with torch.no_grad():
        ref32 = hf(input_ids=ids, attention_mask=mask).logits
    model = fastlm.from_pretrained(hf, dtype=dtype, device=device)
    with fastlm.use_backend("triton"):
        got = model(ids.to(device), mask.to(device)).logits.cpu()
    tol = ATOL32 if dtype == torch.float32 else 5e-3 * ref32.abs().max().item()
    assert max_err(valid(got, mask), valid(ref32, mask)) <= tol

    hb = hf_bert("h3_d32_v101")
    ids, mask = right_padded(3, 21, 101, [21, 5, 13])
    with torch.no_grad():
        ref32 = hb(input_ids=ids, attention_mask=mask)
    model = fastlm.from_pretrained(hb, dtype=dtype, device=device)
    with fastlm.use_backend("triton"):
        got = model(ids.to(device), mask.to(device))
        full = model(ids.to(device)).last_hidden_state.cpu()
    tol = ATOL32 if dtype == torch.float32 else 5e-3 * ref32.last_hidden_state.abs().max().item()
    assert max_err(valid(got.last_hidden_state.cpu(), mask), valid(ref32.last_hidden_state, mask)) <= tol
    assert got.last_hidden_state[~mask.bool().to(device)].abs().max() == 0  # padding comes back as 0
    with torch.no_grad():
        assert max_err(full, hb(input_ids=ids).last_hidden_state) <= tol


def test_bert_unpadded_equals_padded_reference():
    hb = hf_bert("h4_d32_tt3")
    model = fastlm.from_pretrained(hb)
    ids, mask = right_padded(4, 16, 333, [16, 3, 9, 1])
    mask[1] = torch.tensor([0, 1] * 8)  # holes, not just a right pad
    with torch.no_grad():
        expect = hb(input_ids=ids, attention_mask=mask).last_hidden_state
    got = model(ids, mask).last_hidden_state
    assert max_err(valid(got, mask), valid(expect, mask)) <= ATOL32


def test_decode_projections_keep_the_cpu_layout_through_to():
    from fastlm.linear import PackedLinear

    model = fastlm.from_pretrained(tf.GPT2Config(**GPT2_CONFIGS["h3_d32_v101"]))
    assert all(isinstance(lin, PackedLinear) and lin.packed is not None for lin in model.decode_linears())
    assert isinstance(model.wte, torch.nn.Embedding)  # the tied head has its own packed copy
    ids = torch.randint(0, 101, (1, 7))
    before = model(ids).logits
    model.to(torch.float64)  # no fp64 kernel: plain nn.Linear again, head tied to wte
    assert all(type(lin) is torch.nn.Linear for lin in model.decode_linears())
    assert model.lm_head.weight is model.wte.weight
    w = model.h[0].mlp.c_fc.weight
    assert w.t().is_contiguous() and w.dtype == torch.float64  # (in, out) memory on CPU
    model.to(torch.float32)  # _apply re-packs, values unchanged
    assert all(isinstance(lin, PackedLinear) and lin.packed is not None for lin in model.decode_linears())
    assert torch.equal(model(ids).logits, before)


# -- transformers' arguments: dtype names, devices, forward keywords (issue 24) ------------------

def test_from_pretrained_dtype_names_as_transformers_takes_them(tmp_path):
    hf = randomize_(tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2_CONFIGS["h3_d32_v101"])).eval())
    hf.save_pretrained(tmp_path)
    for name, expect in [("fp16", torch.float16), ("float16", torch.float16), ("torch.float16", torch.float16),
                         ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("fp32", torch.float32),
                         ("auto", torch.float32), (torch.bfloat16, torch.bfloat16)]:
        assert fastlm.from_pretrained(tmp_path, dtype=name).wte.weight.dtype == expect, name
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        ref = hf.to(torch.bfloat16)(ids).logits.float()
    got = fastlm.from_pretrained(tmp_path, dtype="bf16")(ids).logits.float()
    assert max_err(got, ref) <= 0.1 * ref.abs().max()
    with pytest.raises(ValueError, match=r"from_pretrained: dtype 'float64' is not supported.*'fp16'"):
        fastlm.from_pretrained(tmp_path, dtype="float64")
    with pytest.raises(ValueError, match="from_pretrained: dtype must be torch.float32, float16 or bfloat16"):
        fastlm.from_pretrained(tmp_path, dtype=torch.int8)
    with pytest.raises(TypeError, match="from_pretrained: dtype must be a torch.dtype"):
        fastlm.from_pretrained(tmp_path, dtype=16)


def test_from_pretrained_device_this_machine_lacks(tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    cfg = tf.BertConfig(**BERT_CONFIGS["h3_d32_v101"])
    with pytest.raises(ValueError, match=rf"from_pretrained: device='{missing}' asks for .*, but this"):
        fastlm.from_pretrained(cfg, device=missing)
    with pytest.raises(ValueError, match="from_pretrained: device 'gpu' is not a device"):
        fastlm.from_pretrained(cfg, device="gpu")
    with pytest.raises(TypeError, match="from_pretrained: device must be a str"):
        fastlm.from_pretrained(cfg, device=1.5)
    assert fastlm.from_pretrained(cfg, device=torch.device("cpu")).device == torch.device("cpu")


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_forward_takes_transformers_keywords(family):
    if family == "bert":
        hf = randomize_(tf.BertForSequenceClassification(tf.BertConfig(**BERT_CONFIGS["h3_d32_v101"])).eval())
    else:
        hf = randomize_(tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2_CONFIGS["h3_d32_v101"])).eval())
    model = fastlm.from_pretrained(hf)
    ids = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        expect = hf(ids, return_dict=False)
    got = model(ids, return_dict=False)
    assert isinstance(got, tuple) and isinstance(expect, tuple)
    assert max_err(got[0], expect[0]) <= ATOL32
    assert max_err(model(ids, return_dict=True, output_hidden_states=False, output_attentions=None,
                         use_cache=False).logits, expect[0]) <= ATOL32
    for kw in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=rf"forward: {kw}=True is not supported.*fastlm.optimize"):
            model(ids, **{kw: True})
    with pytest.raises(ValueError, match="forward: labels=a tensor is not supported: .*no loss"):
        model(ids, labels=ids)
    with pytest.raises(TypeError, match="forward: unexpected keyword argument 'foo'"):
        model(ids, foo=1)


def test_bert_bf16_unpadded_within_2x_of_transformers():
    """bf16 BERT without a mask (the batched path: fused QKV views -> attention_blocked's bf16
    kernel where the CPU has AVX-512, else SDPA): last_hidden_state's error against transformers fp32
    <= 2x transformers' own bf16 error, at an awkward length."""
    from fastlm import fused

    hb = hf_bert("h4_d32_tt3")
    ids = torch.randint(0, 333, (3, 97))
    with torch.no_grad():
        ref32 = hb(input_ids=ids).last_hidden_state
        plain = hb.to(torch.bfloat16)(input_ids=ids).last_hidden_state
    model = fastlm.from_pretrained(hb, dtype=torch.bfloat16)
    # unsplit (FASTLM_CPU_BATCH_SPLIT=0): the profiler sees the calling thread's ops only, and with
    # AMX-BF16 the batch would be split over worker threads (tests/test_cpu_split.py tests that route)
    with mock.patch.dict(os.environ, {"FASTLM_CPU_BATCH_SPLIT": "0"}), \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        got = model(ids).last_hidden_state
    assert got.dtype == torch.bfloat16
    names = [e.key for e in p.key_averages()]
    assert ("fastlm::attention_blocked" in names) == fused._has_avx512()
    err, base = max_err(got, ref32), max_err(plain, ref32)
    assert err <= 2 * base + 1e-3 * ref32.abs().max().item(), (err, base)
