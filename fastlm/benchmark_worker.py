"""One engine, one workload, in a process of its own: the worker behind `fastlm bench --suite peers`.

Each engine (fastlm, transformers, CTranslate2) gets a fresh process with its own thread pool,
so no pool fights another and no engine inherits another's warm caches or allocator state.

    python -m fastlm.benchmark_worker prepare --work gpt2|bert --cache DIR
    python -m fastlm.benchmark_worker time --work gpt2|bert --engine fastlm|transformers|ctranslate2|bandwidth
        --precision fp32|int8 --cache DIR [--calls 3] [--threads 2] [--size base|tiny]

`time` prints one JSON line: {"ms": [per call...], "cpu_ms": [...], "per": "token"|"call"} (wall ms per
generated token for GPT-2 decode, per forward for BERT, and the process's CPU time over all its threads
for the same; {"gbs": [...]} for bandwidth) or {"skip": reason}.

The models are random-weight GPT-2 small (GPT2Config()) and BERT-base (BertConfig()), saved once
under the cache directory with a WordLevel tokenizer of the model's vocabulary size (CTranslate2's
converter needs a tokenizer); CTranslate2 converts that directory offline, in fp32: its int8 rows
quantize at load (compute_type="int8"), as CTranslate2 does.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

# The workloads (issue 10's table): GPT-2 small greedy decode, batch 1, 16-token prompt, 32 new
# tokens; BERT-base forward, batch 8, 128 tokens.
GPT2_PROMPT, GPT2_NEW = 16, 32
BERT_B, BERT_S = 8, 128
READ_MB = 384  # the bandwidth buffer: far larger than any L3 here


# "base": GPT-2 small and BERT-base, the models of the table; "tiny": the same code paths on
# models small enough for the tests (2 layers, width 64, vocabulary 1000).
TINY = {"gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 128,
                 "initializer_range": 0.4},
        "bert": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                 "vocab_size": 1000, "max_position_embeddings": 128}}


def model_dir(cache: str, work: str, size: str = "base") -> str:
    import transformers

    return os.path.join(cache, f"{work}-{size}-random-tf{transformers.__version__}")


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


def prepare(cache: str, work: str, size: str = "base", *, ct2: bool = True) -> str:
    """Save the random-weight model (seed 0) and its tokenizer once, and convert it for
    CTranslate2 when that is installed. Returns the transformers directory."""
    import torch
    import transformers as tf

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
    if ct2:
        try:
            import ctranslate2
        except ImportError:
            return d
        out = os.path.join(d, f"ct2-{ctranslate2.__version__}")
        if not os.path.exists(os.path.join(out, "model.bin")):
            ctranslate2.converters.TransformersConverter(d).convert(out + ".partial", force=True)
            os.replace(out + ".partial", out)
    return d


def _inputs(work: str, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    if work == "gpt2":
        return torch.randint(0, vocab, (1, GPT2_PROMPT), generator=g)
    return torch.randint(0, min(vocab, 30000), (BERT_B, BERT_S), generator=g)


class Skip(Exception):
    pass


def make_runner(work: str, engine: str, precision: str, d: str, threads: int):
    """A zero-argument callable running one call of the workload, and its per-call divisor."""
    import torch

    torch.set_num_threads(threads)
    with open(os.path.join(d, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ids = _inputs(work, vocab)
    new = GPT2_NEW
    if engine == "fastlm":
        import fastlm

        kw = {}
        if precision == "int8":
            if "quantize" not in inspect.signature(fastlm.from_pretrained).parameters:
                raise Skip("fastlm.from_pretrained has no quantize= yet (issue 10 item 2)")
            kw["quantize"] = "int8" if work == "gpt2" else "int8_dynamic"
        try:
            m = fastlm.from_pretrained(d, dtype=torch.float32, device="cpu", **kw)
        except (ValueError, NotImplementedError) as e:
            raise Skip(f"fastlm quantize={kw.get('quantize')}: {e}") from None
        if work == "gpt2":
            def run():
                out = m.generate(ids, max_new_tokens=new)
                assert out.shape[1] == GPT2_PROMPT + new, out.shape
            return run, new
        return lambda: m(ids), 1
    if engine == "transformers":
        import transformers as tf

        if precision != "fp32" and work == "gpt2":
            raise Skip("torch's dynamic int8 quantization covers nn.Linear; GPT-2's Conv1D projections stay fp32")
        cls = tf.GPT2LMHeadModel if work == "gpt2" else tf.BertModel
        m = cls.from_pretrained(d, attn_implementation="sdpa").eval()
        if precision == "int8":  # torch.ao dynamic quantization: int8 weights, per-token int8 activations
            m = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
        if work == "gpt2":
            def run():
                with torch.inference_mode():
                    out = m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
                assert out.shape[1] == GPT2_PROMPT + new, out.shape
            return run, new

        def fwd():
            with torch.inference_mode():
                return m(input_ids=ids)
        return fwd, 1
    if engine == "ctranslate2":
        try:
            import ctranslate2
        except ImportError:
            raise Skip("ctranslate2 is not installed (pip install 'fastlm[peers]')") from None
        path = os.path.join(d, f"ct2-{ctranslate2.__version__}")
        compute = {"fp32": "float32", "int8": "int8"}[precision]
        if work == "gpt2":
            gen = ctranslate2.Generator(path, device="cpu", compute_type=compute, intra_threads=threads,
                                        inter_threads=1)
            prompt = [gen_tokens(d, ids[0].tolist())]

            def run():
                r = gen.generate_batch(prompt, max_length=new, min_length=new, sampling_topk=1,
                                       include_prompt_in_result=False)
                assert len(r[0].sequences_ids[0]) == new, len(r[0].sequences_ids[0])
            return run, new
        enc = ctranslate2.Encoder(path, device="cpu", compute_type=compute, intra_threads=threads, inter_threads=1)
        batch = ids.tolist()
        return lambda: enc.forward_batch(batch), 1
    raise ValueError(f"engine must be fastlm, transformers, ctranslate2 or bandwidth, got {engine!r}")


def gen_tokens(d: str, ids: list[int]) -> list[str]:
    """Token ids -> the converted model's token strings (CTranslate2's Generator takes strings)."""
    with open(os.path.join(d, "tokenizer.json")) as f:
        vocab = json.load(f)["model"]["vocab"]
    inv = {i: s for s, i in vocab.items()}
    return [inv[i] for i in ids]


def read_bandwidth(threads: int, calls: int) -> list[float]:
    """GB/s of a READ_MB fp32 buffer summed by `threads` threads: the machine's read bandwidth,
    the bound a decode step that streams its weights from DRAM cannot beat. The peers suite runs it
    with THP_MEM_ALLOC_ENABLE=1 (the buffer on transparent huge pages, as fastlm's packed weights)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(READ_MB * 2**20 // 4)
    x.sum()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        x.sum()
        out.append(x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.benchmark_worker")
    p.add_argument("action", choices=["prepare", "time"])
    p.add_argument("--work", choices=["gpt2", "bert"], default="gpt2")
    p.add_argument("--engine", default="fastlm")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    p.add_argument("--cache", required=True)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", choices=["base", "tiny"], default="base")
    a = p.parse_args(argv)
    if a.action == "prepare":
        print(json.dumps({"dir": prepare(a.cache, a.work, a.size)}))
        return 0
    if a.engine == "bandwidth":
        print(json.dumps({"gbs": read_bandwidth(a.threads, max(a.calls, 3))}))
        return 0
    try:
        run, per = make_runner(a.work, a.engine, a.precision, model_dir(a.cache, a.work, a.size), a.threads)
    except Skip as e:
        print(json.dumps({"skip": str(e)}))
        return 0
    run()  # warm-up: allocations, caches, lazy init
    ms, cpu_ms = [], []
    for _ in range(a.calls):
        c0, t0 = time.process_time(), time.perf_counter()
        run()
        ms.append((time.perf_counter() - t0) * 1e3 / per)
        cpu_ms.append((time.process_time() - c0) * 1e3 / per)  # all threads of this process
    print(json.dumps({"ms": ms, "cpu_ms": cpu_ms, "per": "token" if per > 1 else "call"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
