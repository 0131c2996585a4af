"""CPU encoder batches run at bucketed packed-row counts (fastlm.models.bert.bucket_rows, docs/serve.md
"Memory"): the sizes are bounded and close to n, and the real tokens' outputs are bit-identical to the
unbucketed run (the extra rows are sequences of their own), with right and left padding (ghost rows),
float32 and int8_dynamic; equal to transformers either way."""

import pytest
import torch
import transformers as tf
from conftest import randomize_

import fastlm
from fastlm.models import bert
from fastlm.testing import max_err


def test_bucket_rows_bounded_and_close():
    sizes = [bert.bucket_rows(n) for n in range(1, 16385)]
    assert all(b >= n for n, b in enumerate(sizes, 1))
    assert all(b <= max(n + 15, n * 9 // 8) for n, b in enumerate(sizes, 1))  # <= 12.5% (16 rows below 128)
    assert sizes == sorted(sizes) and len(set(sizes)) == 64
    assert [bert.bucket_rows(n) for n in (1, 17, 129, 1000)] == [16, 32, 144, 1024] and bert.bucket_rows(0) == 0


@pytest.fixture
def unbucketed(monkeypatch):
    # whole batches: the int8_dynamic batch split (fastlm/cpu_split.py, tests/test_cpu_split.py) would
    # hand a chunk its row without padding, and BUCKET_ROWS = False runs that on the dense attention
    # (not varlen): float32 rounding apart from the bucketed varlen run, not what this compares
    monkeypatch.setenv("FASTLM_CPU_BATCH_SPLIT", "0")
    yield
    bert.BUCKET_ROWS = True


@pytest.mark.parametrize("quantize", [None, "int8_dynamic"])
def test_bucketed_rows_bit_identical(unbucketed, quantize):
    torch.manual_seed(5)
    cfg = tf.BertConfig(num_hidden_layers=2, num_attention_heads=3, hidden_size=96, intermediate_size=200,
                        vocab_size=101, max_position_embeddings=160)
    hf = randomize_(tf.BertModel(cfg).eval())
    m = fastlm.from_pretrained(hf, quantize=quantize)
    for B, S in ((3, 17), (7, 97), (2, 129)):  # packed rows 27..253: extra rows in 1-3 extra sequences
        ids = torch.randint(1, 101, (B, S))
        lens = torch.randint(1, S + 1, (B,))
        lens[0] = S
        mask = (torch.arange(S)[None] < lens[:, None]).long()
        mask[1] = mask[1].flip(0)  # left padding: position 0 of row 1 is a ghost row
        outs = {}
        for on in (True, False):
            bert.BUCKET_ROWS = on
            outs[on] = m(ids, mask).last_hidden_state * mask[..., None]
        assert bert.bucket_rows(int(mask.sum())) > int(mask.sum())  # the bucketed run had extra rows
        assert torch.equal(outs[True], outs[False]), (B, S, quantize)
        if quantize is None:
            ref = hf(ids, attention_mask=mask).last_hidden_state * mask[..., None]
            assert max_err(outs[True], ref) < 1e-4
