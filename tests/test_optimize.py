"""fastlm.optimize on transformers models: outputs, generate, save_pretrained, restore, fallbacks."""

import warnings

import pytest
import torch
import transformers as tf
from conftest import randomize_

import fastlm
from fastlm.integrations import attention as fl_attention
from fastlm.testing import max_err

BERT = dict(num_hidden_layers=2, num_attention_heads=3, hidden_size=96, intermediate_size=200, vocab_size=101)
GPT2 = dict(n_layer=2, n_head=3, n_embd=96, vocab_size=101, n_positions=64, bos_token_id=0, eos_token_id=0)
BERT_CLASSES = [tf.BertModel, tf.BertForSequenceClassification, tf.BertForMaskedLM, tf.BertForTokenClassification,
                tf.BertForQuestionAnswering]
ATOL = 1e-4


def inputs(B=3, S=14, V=101, left=False):
    ids = torch.randint(1, V, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    if left:
        mask[1, :5] = 0
        mask[2, :9] = 0
    else:
        mask[1, 9:] = 0
        mask[2, 4:] = 0
    return ids, mask


def outputs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def compare(a, b, mask):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if x.dim() >= 2 and x.shape[:2] == mask.shape:  # per-token outputs: valid positions only
            x, y = x[mask.bool()], y[mask.bool()]
        assert max_err(x, y) <= ATOL, k


@pytest.mark.parametrize("cls", BERT_CLASSES, ids=lambda c: c.__name__)
def test_bert_classes(cls):
    model = randomize_(cls(tf.BertConfig(**BERT)).eval())
    ids, mask = inputs()
    before = outputs(model, ids, mask)
    assert fastlm.optimize(model) is model
    compare(outputs(model, ids, mask), before, mask)


def test_bert_unpadded_encoder_and_its_fallbacks():
    """A right-padded batch takes the unpadded encoder (padded positions come back 0, as in
    fastlm's BertModel); per-layer hidden states and left padding keep transformers' padded path."""
    model = randomize_(tf.BertModel(tf.BertConfig(**BERT)).eval())
    ids, mask = inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ref_left = model(input_ids=ids, attention_mask=inputs(left=True)[1]).last_hidden_state
    fastlm.optimize(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        left = model(input_ids=ids, attention_mask=inputs(left=True)[1]).last_hidden_state
    keep = mask.bool()
    assert max_err(out.last_hidden_state[keep], ref.last_hidden_state[keep]) <= ATOL
    assert bool((out.last_hidden_state[~keep] == 0).all())  # unpadded: padding never computed
    assert len(hs.hidden_states) == len(ref.hidden_states) == BERT["num_hidden_layers"] + 1
    for a, b in zip(hs.hidden_states, ref.hidden_states, strict=True):
        assert max_err(a[keep], b[keep]) <= ATOL
    lkeep = inputs(left=True)[1].bool()
    assert max_err(left[lkeep], ref_left[lkeep]) <= ATOL
    assert max_err(left[:, 0], ref_left[:, 0]) <= ATOL  # [CLS] slot of left-padded rows, as transformers


@pytest.mark.parametrize("cls", [tf.GPT2Model, tf.GPT2LMHeadModel], ids=lambda c: c.__name__)
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_gpt2_classes(cls, left):
    model = randomize_(cls(tf.GPT2Config(**GPT2)).eval())
    ids, mask = inputs(left=left)
    before = outputs(model, ids, mask)
    fastlm.optimize(model)
    compare(outputs(model, ids, mask), before, mask)


def test_optimized_gpt2_generate_is_unchanged():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2, initializer_range=0.4)).eval()
    ids, mask = inputs(left=True)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expect = model.generate(ids, attention_mask=mask, **kw)
    assert len(set(expect[:, 14:].flatten().tolist())) >= 8
    fastlm.optimize(model)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, attention_mask=mask, **kw), expect)


def test_save_pretrained_after_optimize_loads_in_plain_transformers(tmp_path):
    model = randomize_(tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2)).eval())
    ids, mask = inputs()
    expect = outputs(model, ids, mask)
    fastlm.optimize(model)
    model.save_pretrained(tmp_path)
    plain = tf.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert plain.config._attn_implementation != "fastlm"
    assert not any("_fastlm" in k for k in plain.state_dict())
    got = outputs(plain, ids, mask)
    for k in expect:
        assert torch.equal(got[k], expect[k]), k


def test_idempotent_and_restore():
    model = randomize_(tf.BertForSequenceClassification(tf.BertConfig(**BERT)).eval())
    ids, mask = inputs()
    before = outputs(model, ids, mask)
    keys = list(model.state_dict())
    fastlm.optimize(model)
    fastlm.optimize(model)  # twice is safe
    assert list(model.state_dict()) == keys
    assert model.config._attn_implementation == "fastlm"
    fastlm.restore(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ or "feed_forward_chunk" in m.__dict__ for m in model.modules())
    after = outputs(model, ids, mask)
    for k in before:
        assert torch.equal(after[k], before[k])
    fastlm.restore(model)  # restoring twice is a no-op


def test_other_instances_are_untouched():
    a = tf.BertModel(tf.BertConfig(**BERT)).eval()
    b = tf.BertModel(tf.BertConfig(**BERT)).eval()
    fastlm.optimize(a)
    assert b.config._attn_implementation != "fastlm"
    assert "feed_forward_chunk" not in b.encoder.layer[0].__dict__


def test_fallbacks_warn_once_and_stay_correct():
    model = randomize_(tf.BertModel(tf.BertConfig(**BERT)).eval())
    ids, mask = inputs()
    model.set_attn_implementation("eager")  # transformers returns attention weights with eager only
    with torch.no_grad():
        expect = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    fastlm.optimize(model)
    fl_attention._warned.clear()
    with pytest.warns(UserWarning, match="attention weights were requested"):
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert got.attentions is not None and len(got.attentions) == 2
    assert max_err(got.attentions[0], expect.attentions[0]) < 1e-5
    assert max_err(got.last_hidden_state[mask.bool()], expect.last_hidden_state[mask.bool()]) <= ATOL
    # train mode: dropout runs transformers' code (a warning), eval is fast again
    model.train()
    with pytest.warns(UserWarning, match="dropout"):
        model(input_ids=ids, attention_mask=mask)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)


def test_unsupported_models_and_placements():
    with pytest.raises(TypeError, match="supported: BertModel"):
        fastlm.optimize(tf.AlbertModel(tf.AlbertConfig(**BERT)))
    with pytest.raises(TypeError, match="not supported and holds no supported transformers model"):
        fastlm.optimize(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        fastlm.optimize(object())
    with torch.device("meta"):
        meta = tf.BertModel(tf.BertConfig(**BERT))
    with pytest.raises(ValueError, match="meta device"):
        fastlm.optimize(meta)


def test_compile_fullgraph_of_an_optimized_model():
    model = randomize_(tf.BertModel(tf.BertConfig(**BERT)).eval())
    ids, mask = inputs()
    expect = outputs(model, ids, mask)["last_hidden_state"]
    fastlm.optimize(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_err(got[mask.bool()], expect[mask.bool()]) <= ATOL


def test_nn_drop_ins_from_hf():
    from fastlm.nn import FusedAttention, FusedFFN, FusedLayerNorm

    gpt = randomize_(tf.GPT2Model(tf.GPT2Config(**GPT2)).eval())
    bert = randomize_(tf.BertModel(tf.BertConfig(**BERT)).eval())
    x = torch.randn(2, 11, 96)
    blk = gpt.h[0]
    with torch.no_grad():
        assert max_err(FusedFFN.from_hf(blk.mlp)(x), blk.mlp(x)) <= ATOL
        assert max_err(FusedLayerNorm.from_hf(blk.ln_1)(x), blk.ln_1(x)) <= 1e-5
        assert max_err(FusedAttention.from_hf(blk.attn)(x), blk.attn(x)[0]) <= ATOL
        layer = bert.encoder.layer[0]
        ffn = FusedFFN.from_hf(layer)
        assert max_err(ffn(x), layer.output.dense(layer.intermediate(x))) <= ATOL
        att = FusedAttention.from_hf(layer.attention)
        ref = layer.attention.self(x)[0]
        assert max_err(att(x), layer.attention.output.dense(ref)) <= ATOL
        y, s = FusedLayerNorm.from_hf(layer.output.LayerNorm)(x, residual=x)
        assert max_err(s, 2 * x) == 0
    assert "activation=gelu_tanh" in repr(FusedFFN.from_hf(blk.mlp))
    assert "causal=True" in repr(FusedAttention.from_hf(blk.attn))
    with pytest.raises(TypeError, match="needs a GPT2MLP or a BertLayer"):
        FusedFFN.from_hf(torch.nn.Linear(2, 2))


class Wrapper(torch.nn.Module):
    """A user's module holding two transformers models and a layer of its own."""

    def __init__(self):
        super().__init__()
        self.enc = randomize_(tf.BertForSequenceClassification(tf.BertConfig(**BERT)).eval())
        self.lm = randomize_(tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2)).eval())
        self.proj = torch.nn.Linear(5, 3)

    def forward(self, ids, mask):
        return self.proj(torch.cat([self.enc(input_ids=ids, attention_mask=mask).logits,
                                    self.lm(input_ids=ids, attention_mask=mask).logits[:, 0, :3]], -1))


def test_optimize_walks_a_wrapper_and_restore_undoes_it():
    w = Wrapper().eval()
    ids, mask = inputs(left=True)
    with torch.no_grad():
        before = w(ids, mask)
    assert fastlm.optimize(w) is w
    assert w.enc.config._attn_implementation == "fastlm" and w.lm.config._attn_implementation == "fastlm"
    assert "feed_forward_chunk" in w.enc.bert.encoder.layer[0].__dict__
    assert fastlm.is_optimized(w) and fastlm.is_optimized(w.enc)
    with torch.no_grad():
        assert max_err(w(ids, mask), before) <= ATOL
    fastlm.restore(w)
    assert not fastlm.is_optimized(w) and w.enc.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(w(ids, mask), before)


def test_optimize_a_pipeline():
    model = randomize_(tf.BertForSequenceClassification(tf.BertConfig(**BERT, num_labels=3)).eval())
    ids, mask = inputs()
    before = outputs(model, ids, mask)

    class Pipe:  # what optimize reads of a transformers pipeline: its .model
        def __init__(self, model):
            self.model = model

    pipe = Pipe(model)
    assert fastlm.optimize(pipe) is pipe and model.config._attn_implementation == "fastlm"
    compare(outputs(model, ids, mask), before, mask)
    fastlm.restore(pipe)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_left_padded_classifier_through_optimize(left):
    """issue 12.6 through optimize: the pooler reads position 0, padding under left padding."""
    model = randomize_(tf.BertForSequenceClassification(tf.BertConfig(**BERT, num_labels=4)).eval())
    ids, mask = inputs(left=left)
    before = outputs(model, ids, mask)
    fastlm.optimize(model)
    assert max_err(outputs(model, ids, mask)["logits"], before["logits"]) <= ATOL


GRAD_MODELS = {
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**BERT, num_labels=3)),
    "distilbert": lambda: tf.DistilBertModel(tf.DistilBertConfig(n_layers=2, n_heads=3, dim=96, hidden_dim=200,
                                                                 vocab_size=101)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(**GPT2)),
}


@pytest.mark.parametrize("name", list(GRAD_MODELS))
def test_backward_after_optimize_gives_transformers_gradients(name):
    """fastlm's fused ops have no backward: a forward that autograd records runs transformers' code
    in the optimized modules, so every parameter gets the unoptimized model's gradient (none is
    dropped), in eval mode (no dropout) with a padded batch; without grad the kernels still run."""
    import copy

    torch.manual_seed(1)
    ref = randomize_(GRAD_MODELS[name]().eval())
    opt = copy.deepcopy(ref)
    fastlm.optimize(opt)
    ids, mask = inputs()
    weights = None
    for m in (ref, opt):
        out = m(input_ids=ids, attention_mask=mask)
        y = out.logits if hasattr(out, "logits") else out.last_hidden_state
        if weights is None:
            weights = torch.randn_like(y)
        if y.dim() == 3:  # per-token outputs: real tokens only (padded positions differ by contract)
            y, w = y[mask.bool()], weights[mask.bool()]
        else:
            w = weights
        (y * w).sum().backward()
    grads = dict(opt.named_parameters())
    n = 0
    for pname, p in ref.named_parameters():
        q = grads[pname]
        assert (p.grad is None) == (q.grad is None), pname
        if p.grad is not None:
            n += 1
            assert max_err(q.grad, p.grad) <= 1e-4 * max(1.0, p.grad.abs().max().item()), pname
    assert n >= len(grads) - 2  # nearly every parameter has a gradient (gpt2's tied head is one)
    with torch.no_grad():  # inference: the optimized path (kernels), same outputs
        compare(outputs(opt, ids, mask), outputs(ref, ids, mask), mask)


def test_ops_record_gradients_through_the_reference():
    """Raw ops under autograd run the reference (plain torch ops with a backward): every input
    gets the reference's gradient."""
    from fastlm import ops, reference

    x = torch.randn(5, 16, requires_grad=True)
    w1, b1 = torch.randn(24, 16, requires_grad=True), torch.randn(24, requires_grad=True)
    w2, b2 = torch.randn(16, 24, requires_grad=True), torch.randn(16, requires_grad=True)
    g, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    q, k, v = (torch.randn(2, 3, 7, 8, requires_grad=True) for _ in range(3))
    leaves = [x, w1, b1, w2, b2, g, b, q, k, v]
    runs = {
        "fastlm": lambda: [ops.ffn(x, w1, b1, w2, b2), ops.layer_norm(x, g, b, 1e-5), ops.bias_gelu(x, b),
                           ops.attention(q, k, v, causal=True), ops.softmax(x, scale=0.5)],
        "reference": lambda: [reference.ffn(x, w1, b1, w2, b2, "gelu", None),
                              reference.layer_norm(x, g, b, 1e-5, None), reference.bias_gelu(x, b, "none"),
                              reference.attention(q, k, v, True, None, 8 ** -0.5), reference.softmax(x, -1, 0.5, None)],
    }
    grads, weights = {}, None
    for name, run in runs.items():
        outs = run()
        weights = weights or [torch.randn_like(o) for o in outs]
        sum((o * w).sum() for o, w in zip(outs, weights, strict=True)).backward()
        grads[name] = [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
    for a, b_ in zip(grads["fastlm"], grads["reference"], strict=True):
        assert torch.equal(a, b_)
