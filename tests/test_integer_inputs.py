"""Issue 12.3: every integer argument (input_ids, token_type_ids, position_ids, attention_mask,
cache_seqlens, cu_seqlens) gets a dtype, shape and range check with fastlm's message naming it,
never torch's raw "indices" error; on the CPU path and with the ops on the Triton interpreter."""

import pytest
import torch
import transformers as tf

import fastlm
from fastlm import ops
from fastlm.models.common import InputDTypeError

BACKENDS = ["auto", "triton"]


@pytest.fixture(scope="module")
def bert():
    cfg = tf.BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=32, intermediate_size=64,
                        vocab_size=97, max_position_embeddings=24, type_vocab_size=3)
    return fastlm.from_pretrained(cfg)


@pytest.fixture(scope="module")
def gpt2():
    return fastlm.from_pretrained(tf.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=97, n_positions=24,
                                                initializer_range=0.4))


def ids(B=2, S=5):
    return torch.randint(1, 97, (B, S))


def raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_integer_arguments(bert, backend):
    x = ids()
    with fastlm.use_backend(backend):
        # dtype: a float or bool where ids belong is fastlm's InputDTypeError (a ValueError), not torch's
        for bad in (torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.float16)):
            raises(InputDTypeError, "token_type_ids must be an integer tensor", bert, x, token_type_ids=bad)
        raises(ValueError, "token_type_ids must be an integer tensor", bert, x, token_type_ids=torch.zeros(2, 5))
        raises(InputDTypeError, "attention_mask must be an integer or bool tensor", bert, x, torch.ones(2, 5))
        raises(InputDTypeError, "input_ids must be an integer tensor", bert, x.float())
        # shape
        raises(ValueError, r"token_type_ids must have the shape of input_ids \(2, 5\)", bert, x,
               token_type_ids=torch.zeros(2, 4, dtype=torch.long))
        raises(ValueError, "token_type_ids must have the shape", bert, x,
               token_type_ids=torch.zeros(5, dtype=torch.long))
        raises(ValueError, "attention_mask must have the shape", bert, x, torch.ones(1, 5, dtype=torch.long))
        # range
        raises(ValueError, r"token_type_ids must lie in \[0, 3\), got values in \[0, 3\]", bert, x,
               token_type_ids=torch.tensor([[0, 1, 2, 3, 0]] * 2))
        raises(ValueError, r"token_type_ids must lie in \[0, 3\), got values in \[-1, 0\]", bert, x,
               token_type_ids=torch.tensor([[0, 0, -1, 0, 0]] * 2))
        raises(ValueError, "attention_mask must be 0 or 1, got values in", bert, x, torch.tensor([[1, 1, 2, 1, 1]] * 2))
        raises(ValueError, "attention_mask must be 0 or 1", bert, x, torch.tensor([[1, 1, -1, 1, 1]] * 2))
        raises(ValueError, r"input_ids must lie in \[0, 97\)", bert, torch.tensor([[5, -3]]))
        # the good inputs still run, and a bool mask is the int mask
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        tt = torch.tensor([[0, 1, 2, 2, 0]] * 2, dtype=torch.int32)
        a = bert(x, mask, tt.long()).last_hidden_state
        b = bert(x, mask.bool(), tt).last_hidden_state
        assert torch.equal(a, b) and torch.isfinite(a).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_integer_arguments(gpt2, backend):
    x = ids()
    with fastlm.use_backend(backend):
        for bad in (torch.arange(5.0)[None].expand(2, 5), torch.zeros(2, 5, dtype=torch.bool)):
            raises(InputDTypeError, "position_ids must be an integer tensor", gpt2, x, position_ids=bad)
        raises(ValueError, "position_ids must be an integer tensor", gpt2, x, position_ids=torch.zeros(1, 5))
        raises(InputDTypeError, "attention_mask must be an integer or bool tensor", gpt2, x, torch.ones(2, 5))
        raises(ValueError, r"position_ids must have the shape of input_ids \(2, 5\) or \(1, 5\)", gpt2, x,
               position_ids=torch.arange(4)[None])
        raises(ValueError, r"position_ids must lie in \[0, 24\), got values in \[0, 24\]", gpt2, x,
               position_ids=torch.tensor([[0, 1, 2, 3, 24]]))
        raises(ValueError, r"position_ids must lie in \[0, 24\)", gpt2, x,
               position_ids=torch.tensor([[-1, 1, 2, 3, 4]]))
        raises(ValueError, "attention_mask must be 0 or 1", gpt2, x, torch.tensor([[1, 1, 1, 1, 3]] * 2))
        raises(ValueError, r"input_ids must lie in \[0, 97\)", gpt2, torch.tensor([[96, 97]]))
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
        a = gpt2(x, mask).logits
        assert torch.equal(a, gpt2(x, mask.bool()).logits)
        pos = torch.arange(5)[None]
        assert torch.equal(gpt2(x, position_ids=pos.int()).logits, gpt2(x).logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_integer_arguments(gpt2, backend):
    x = ids()
    with fastlm.use_backend(backend):
        raises(InputDTypeError, "generate: input_ids must be an integer tensor", gpt2.generate, x.float(),
               max_new_tokens=2)
        raises(InputDTypeError, "generate: attention_mask must be an integer or bool", gpt2.generate, x,
               torch.ones(2, 5), max_new_tokens=2)
        raises(ValueError, "generate: attention_mask must be 0 or 1", gpt2.generate, x, torch.full((2, 5), 2),
               max_new_tokens=2)
        raises(ValueError, r"generate: input_ids must lie in \[0, 97\)", gpt2.generate, x - 5, max_new_tokens=2)
        out = gpt2.generate(x, torch.ones(2, 5, dtype=torch.bool), max_new_tokens=2)
        assert torch.equal(out, gpt2.generate(x, torch.ones(2, 5, dtype=torch.long), max_new_tokens=2))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_op_integer_arguments(backend):
    q = torch.randn(2, 3, 1, 16)
    kc = torch.randn(2, 3, 8, 16)
    t = torch.randn(10, 2, 16)
    with fastlm.use_backend(backend):
        raises(TypeError, "cache_seqlens must be int32, got torch.float32", ops.decode_attention, q, kc, kc,
               torch.tensor([3.0, 4.0]))
        raises(TypeError, "cache_seqlens must be int32, got torch.bool", ops.decode_attention, q, kc, kc,
               torch.tensor([True, False]))
        raises(ValueError, r"cache_seqlens must have shape \(2,\)", ops.decode_attention, q, kc, kc,
               torch.tensor([[3, 4]], dtype=torch.int32))
        raises(TypeError, "cache_seqlens must be a torch.Tensor", ops.decode_attention, q, kc, kc, [3, 4])
        raises(TypeError, "cu_seqlens must be int32, got torch.float32", ops.attention_varlen, t, t, t,
               torch.tensor([0.0, 4.0, 10.0]), 6)
        raises(ValueError, "cu_seqlens must be 1-D", ops.attention_varlen, t, t, t,
               torch.tensor([[0, 4, 10]], dtype=torch.int32), 6)
        raises(ValueError, "cu_seqlens must start at 0", ops.attention_varlen, t, t, t,
               torch.tensor([-2, 4, 10], dtype=torch.int32), 6)
