"""The workloads of the peers suite (issue 10's table) and the random-weight models they run.

GPT-2 small greedy decode (batch 1, 16-token prompt, 32 new tokens; ms per generated token, the
prompt's prefill included) and BERT-base forward (batch 8, 128 tokens; ms per forward). The models
are random-weight GPT-2 small (GPT2Config()) and BERT-base (BertConfig()), saved once under the
cache directory ($FASTLM_BENCH_CACHE, default ~/.cache/fastlm/bench) with a WordLevel tokenizer
of the model's vocabulary size (converters such as CTranslate2's need a tokenizer); each engine
converts or exports that directory itself (Engine.prepare).
"""

from __future__ import annotations

import json
import os

GPT2_PROMPT, GPT2_NEW = 16, 32
BERT_B, BERT_S = 8, 128
# batched greedy decode (issue 19 item 5): B prompts of GPT2_PROMPT tokens, GPT2_NEW new tokens each,
# tokens/s of the whole batch (B * GPT2_NEW new tokens per call, the prefill included)
GPT2_BATCHES = (1, 8, 32)

# case name -> workload; the case's label and unit
WORKS = {"peers_gpt2_decode": "gpt2", "peers_bert_fwd": "bert",
         **{f"peers_gpt2_batch{b}": f"gpt2_b{b}" for b in GPT2_BATCHES}}
PEER_CASES = tuple(WORKS)
LABELS = {"gpt2": "GPT-2 small B1 prompt16 new32", "bert": "BERT-base B8 S128",
          **{f"gpt2_b{b}": f"GPT-2 small batched decode B{b} prompt16 new32" for b in GPT2_BATCHES}}
UNITS = {"gpt2": "ms/token", "bert": "ms", **{f"gpt2_b{b}": "tok/s" for b in GPT2_BATCHES}}


def batch_of(work: str) -> int | None:
    """The batch of a batched-decode workload ("gpt2_b8" -> 8), None for the others."""
    return int(work[len("gpt2_b"):]) if work.startswith("gpt2_b") else None


def model_of(work: str) -> str:
    """The model a workload runs: "gpt2" for the batched-decode workloads too (one saved model)."""
    return "gpt2" if batch_of(work) is not None else work

# "base": GPT-2 small and BERT-base, the models of the table; "tiny": the same code paths on
# models small enough for the tests (2 layers, width 64, vocabulary 1000).
TINY = {"gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 128,
                 "initializer_range": 0.4},
        "bert": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                 "vocab_size": 1000, "max_position_embeddings": 128}}


def cache_dir() -> str:
    return os.environ.get("FASTLM_BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastlm", "bench")


def gpt2_weight_bytes(precision: str, n_layer: int = 12, d: int = 768, vocab: int = 50257) -> float:
    """Bytes a GPT-2 decode step streams: every block projection (QKV, out, FFN: 12 d^2 per layer)
    and the tied LM head once; biases, LayerNorms (and int8's per-channel fp32 scales) in fp32
    (bf16: everything in bf16, 2 bytes). GPT-2 small: 494 MB fp32, 247 MB bf16, 125 MB int8. The KV
    cache and the two embedding rows are ignored."""
    big = n_layer * 12 * d * d + vocab * d
    small = n_layer * (3 * d + d + 4 * d + d + 4 * d) + 2 * d  # biases + LayerNorm weights/biases
    if precision in ("fp32", "bf16"):
        return (4.0 if precision == "fp32" else 2.0) * (big + small)
    scales = n_layer * (3 * d + d + 4 * d + d) + vocab
    return 1.0 * big + 4.0 * (small + scales)


def floor_ms(read_gbs: float | None, precision: str) -> float | None:
    """The bandwidth floor of one GPT-2 small decode token in ms."""
    if not read_gbs:
        return None
    return gpt2_weight_bytes(precision) / (read_gbs * 1e9) * 1e3


def model_dir(cache: str, work: str, size: str = "base") -> str:
    import transformers

    return os.path.join(cache, f"{model_of(work)}-{size}-random-tf{transformers.__version__}")


def config(work: str, size: str = "base"):
    """The transformers config of a workload: GPT2Config() / BertConfig(), or the tiny ones."""
    import transformers as tf

    if size not in ("base", "tiny"):
        raise ValueError(f"size must be base or tiny, got {size!r}")
    cls = tf.GPT2Config if work == "gpt2" else tf.BertConfig
    return cls(**(TINY[work] if size == "tiny" else {}))


def _tokenizer(vocab_size: int, special: dict[int, str], unk: str):
    """A WordLevel tokenizer whose vocabulary is exactly the model's ids (t0, t1, ...), with the
    model's special tokens at their ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {special.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok


def prepare(cache: str, work: str, size: str = "base") -> str:
    """Save the random-weight model (seed 0) and its tokenizer once. Returns the transformers
    directory (model_dir), which the engines convert from."""
    import torch
    import transformers as tf

    work = model_of(work)
    d = model_dir(cache, work, size)
    cfg = config(work, size)
    if not os.path.exists(os.path.join(d, "config.json")):
        os.makedirs(cache, exist_ok=True)
        torch.manual_seed(0)
        if work == "gpt2":
            cfg.eos_token_id = None  # timed runs make exactly GPT2_NEW tokens
            model = tf.GPT2LMHeadModel(cfg)
            special = {cfg.vocab_size - 1: "<|endoftext|>"}  # GPT-2's id 50256
            kw = dict.fromkeys(("bos_token", "eos_token", "unk_token"), "<|endoftext|>")
        else:
            cfg.position_embedding_type = "absolute"  # CTranslate2's converter still reads it
            model = tf.BertModel(cfg)
            special = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
            special = {i: s for i, s in special.items() if i < cfg.vocab_size}
            kw = dict(unk_token=special.get(100, special[0]), pad_token=special[0])
        tmp = d + ".partial"
        model.eval().save_pretrained(tmp)
        if work == "bert":  # transformers 5 drops the default from config.json
            with open(os.path.join(tmp, "config.json")) as f:
                c = json.load(f)
            c["position_embedding_type"] = "absolute"
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(c, f, indent=1)
        tok = _tokenizer(cfg.vocab_size, special, kw["unk_token"])
        tf.PreTrainedTokenizerFast(tokenizer_object=tok, **kw).save_pretrained(tmp)
        os.replace(tmp, d)
    return d


def inputs(work: str, vocab: int):
    """The token ids every engine runs: (1, GPT2_PROMPT) for gpt2, (B, GPT2_PROMPT) for gpt2_bB,
    (BERT_B, BERT_S) for bert (seed 0)."""
    import torch

    g = torch.Generator().manual_seed(0)
    if model_of(work) == "gpt2":
        return torch.randint(0, vocab, (batch_of(work) or 1, GPT2_PROMPT), generator=g)
    return torch.randint(0, min(vocab, 30000), (BERT_B, BERT_S), generator=g)
