"""llama.cpp in the peers suite (`llama-cpp-python`, which builds llama.cpp from source: about 25 minutes
on 2 cores; `pip install gguf llama-cpp-python`): GPT-2 small only, greedy decode.

llama.cpp's own converter (convert_hf_to_gguf.py) refuses the suite's random-weight model (a
transformers-5 config has no n_ctx, and it hashes the tokenizer to pick a pre-tokenizer, which a
made-up WordLevel vocabulary does not match), so prepare() writes the GGUF files itself with the
`gguf` package's GGUFWriter, with the tensors that converter writes for GPT2LMHeadModel (Conv1D
weights transposed to (out, in), the attention's mask buffers dropped, the LM head tied to
token_embd) and its metadata: gpt2-f32.gguf (F32, file type ALL_F32) and gpt2-q8_0.gguf (Q8_0: every
2-D weight but position_embd in Q8_0, 1-D tensors in F32, as the converter's MOSTLY_Q8_0). The
runner decodes with Llama.eval one token at a time and takes the argmax of the logits (no sampler),
after `reset()` (else llama.cpp reuses the cached prompt).
"""

from __future__ import annotations

import json
import os

from fastlm.bench.peers.base import Engine
from fastlm.bench.peers.workloads import GPT2_NEW, GPT2_PROMPT
from fastlm.bench.result import Skip

FILES = {"fp32": "gpt2-f32.gguf", "int8": "gpt2-q8_0.gguf"}
# HF GPT-2 tensor (after "transformer.") -> GGUF tensor, as gguf.TensorNameMap maps them for MODEL_ARCH.GPT2
_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
          "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_TOP = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}


def converted_dir(model_dir: str) -> str:
    return os.path.join(model_dir, "gguf")


def gguf_tensors(model_dir: str) -> dict:
    """GGUF tensor name -> fp32 numpy array ((out, in) for weights), from the saved GPT2LMHeadModel."""
    from safetensors.numpy import load_file

    out = {}
    for name, t in load_file(os.path.join(model_dir, "model.safetensors")).items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name.startswith("lm_head"):
            continue  # the causal-mask buffers; the head is tied to wte
        stem, kind = name.rsplit(".", 1)
        if stem.startswith("h."):
            _, layer, sub = stem.split(".", 2)
            new = f"blk.{layer}.{_BLOCK[sub]}.{kind}"
            if kind == "weight" and sub not in ("ln_1", "ln_2"):
                t = t.T  # Conv1D keeps (in, out)
        else:
            new = f"{_TOP[stem]}.{kind}"
        out[new] = t.astype("float32").copy()
    return out


def write_gguf(model_dir: str, path: str, precision: str, tokens: list[str] | None = None) -> None:
    """Write the saved GPT-2 as a GGUF file: F32 (`precision` "fp32") or Q8_0 ("int8"). `tokens` (one
    string per id, byte-level BPE pieces as GPT-2's vocab.json spells them) replaces the vocabulary of
    the checkpoint's tokenizer.json (the serve bench gives llama.cpp one that its tokenizer can read)."""
    import gguf
    import numpy as np

    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    if tokens is None:
        with open(os.path.join(model_dir, "tokenizer.json")) as f:
            vocab = json.load(f)["model"]["vocab"]
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    eos = c["vocab_size"] - 1
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_name("gpt2-random")
    w.add_block_count(c["n_layer"])
    w.add_context_length(c["n_positions"])
    w.add_embedding_length(c["n_embd"])
    w.add_feed_forward_length(4 * c["n_embd"])
    w.add_head_count(c["n_head"])
    w.add_layer_norm_eps(c["layer_norm_epsilon"])
    ftype = gguf.LlamaFileType.ALL_F32 if precision == "fp32" else gguf.LlamaFileType.MOSTLY_Q8_0
    w.add_file_type(ftype)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i == eos else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(["t 0"])  # llama.cpp's BPE vocabulary needs the key; token ids go in directly
    w.add_add_bos_token(False)  # a prompt is its tokens alone, as in transformers' GPT-2
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    for name, t in gguf_tensors(model_dir).items():
        if precision == "int8" and t.ndim == 2 and name != "position_embd.weight" and t.shape[-1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def greedy(llm, prompt: list[int], new: int) -> list[int]:
    """Greedy decode of `new` tokens after `prompt` on a llama_cpp.Llama: argmax of the last position's
    logits, read from the context (llama_get_logits_ith(-1)): llama-cpp-python 0.3 fills `Llama.scores`
    only when built with logits_all=True, and left all-zero rows there otherwise (every argmax 0)."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out = []
    for i in range(new):
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))
        out.append(tok)
        if i + 1 < new:
            llm.eval([tok])
    return out


class LlamaCpp(Engine):
    name = "llamacpp"
    title = "llama.cpp"
    module = "llama_cpp"
    install = "pip install gguf llama-cpp-python (builds llama.cpp: ~25 min on 2 cores)"
    prepares = True

    def isa_cap(self, isa):
        return {"env": {}, "forced": "no",
                "note": "not capped: its ggml CPU kernels are compiled for the build machine (GGML_NATIVE)"}

    def missing(self):
        why = super().missing()
        if why is None:
            try:
                import gguf  # noqa: F401
            except ImportError:
                return f"gguf is not installed ({self.install})"
        return why

    def version(self):
        return None if self.missing() else str(__import__("llama_cpp").__version__)

    def math(self, precision):
        return "int8 (Q8_0)" if precision == "int8" else "fp32 (F32)"

    def prepare(self, work, model_dir):
        if work != "gpt2":
            return
        d = converted_dir(model_dir)
        os.makedirs(d, exist_ok=True)
        for precision, f in FILES.items():
            path = os.path.join(d, f)
            if not os.path.exists(path):
                try:
                    write_gguf(model_dir, path + ".partial", precision)
                except Exception as e:
                    raise Skip(f"writing the GGUF file failed: {type(e).__name__}: {str(e)[:200]}") from None
                os.replace(path + ".partial", path)

    def runner(self, work, precision, model_dir, ids, threads):
        if work != "gpt2":
            raise Skip("llama.cpp runs the GPT-2 decode row only")
        from llama_cpp import Llama

        llm = Llama(model_path=os.path.join(converted_dir(model_dir), FILES[precision]), n_ctx=GPT2_PROMPT + GPT2_NEW,
                    n_batch=GPT2_PROMPT, n_threads=threads, n_threads_batch=threads, verbose=False)
        prompt = ids[0].tolist()

        def run():
            assert len(greedy(llm, prompt, GPT2_NEW)) == GPT2_NEW
        return run, GPT2_NEW


ENGINE = LlamaCpp()
