"""The peer servers of `fastlm bench --suite serve`, each in its own process on a free 127.0.0.1 port:

- infinity-emb (`infinity_emb v2`, its torch engine on the CPU, float32, batch size 32, no vector
  cache; OpenAI-compatible `/embeddings`), found as the executable named by $FASTLM_BENCH_INFINITY or
  `infinity_emb` on PATH: it pins transformers < 5, so it lives in a virtual environment of its own
  (docs/serve.md).
- llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`, in this interpreter or
  the one $FASTLM_BENCH_LLAMA_PYTHON names) on the bench's GPT-2 written as GGUF (F32 and Q8_0) by
  fastlm/bench/peers/llamacpp_engine.py, with a byte-level vocabulary llama.cpp's tokenizer reads
  (ids 0-255 GPT-2's byte symbols, in GPT-2's order; the other ids one CJK / Hangul character each), so
  a prompt of n ASCII letters is exactly n tokens and a completion's text gives back its token ids.

Each `*_missing()` returns why the peer cannot run (its rows are then skipped with that reason), or None.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

from fastlm.bench.serve_proc import ServerProcess, free_port

INFINITY_ENV = "FASTLM_BENCH_INFINITY"
LLAMA_ENV = "FASTLM_BENCH_LLAMA_PYTHON"
_QUIET = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
          "INFINITY_ANONYMOUS_USAGE_STATS": "0"}


# -- infinity-emb ------------------------------------------------------------------------------------
def infinity_exe() -> str | None:
    return os.environ.get(INFINITY_ENV) or shutil.which("infinity_emb")


def infinity_missing() -> str | None:
    exe = infinity_exe()
    if exe is None:
        return (f"infinity-emb is not installed (infinity_emb not on PATH and ${INFINITY_ENV} unset; docs/serve.md: "
                "python3.11 -m venv v && v/bin/pip install 'infinity-emb[server,torch]==0.0.78')")
    if not os.access(exe, os.X_OK):
        return f"${INFINITY_ENV} names {exe!r}, which is not an executable"
    return None


def infinity_version() -> str:
    """infinity-emb's version, asked of the interpreter its executable's #! line names."""
    exe = infinity_exe()
    try:
        with open(exe) as f:
            py = f.readline()[2:].strip()
        code = "import infinity_emb, torch; print(infinity_emb.__version__, torch.__version__)"
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120)
        inf, torch = out.stdout.split()
        return f"infinity-emb {inf} (torch {torch})"
    except (OSError, ValueError, subprocess.SubprocessError):
        return "infinity-emb (version unknown)"


def infinity_server(model: str, threads: int) -> ServerProcess:
    port = free_port()
    return ServerProcess([infinity_exe(), "v2", "--model-id", model, "--engine", "torch", "--device", "cpu", "--dtype",
                          "float32", "--batch-size", "32", "--no-vector-disk-cache", "--host", "127.0.0.1", "--port",
                          str(port), "--log-level", "warning"], port,
                         env={"OMP_NUM_THREADS": str(threads), **_QUIET}, route="/embeddings")


# -- llama-cpp-python's server -------------------------------------------------------------------------
def llama_python() -> str:
    return os.environ.get(LLAMA_ENV) or sys.executable


def llama_missing() -> str | None:
    if LLAMA_ENV not in os.environ:
        if importlib.util.find_spec("llama_cpp") is None:
            return ("llama-cpp-python is not installed (pip install 'llama-cpp-python[server]'; it builds llama.cpp: "
                    "~30 min on 2 cores)")
        if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("sse_starlette") is None:
            return "llama-cpp-python's server extra is not installed (pip install 'llama-cpp-python[server]')"
    if importlib.util.find_spec("gguf") is None:
        return "gguf is not installed (pip install gguf): it writes the GPT-2 GGUF files"
    return None


def llama_version() -> str:
    out = subprocess.run([llama_python(), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                         text=True, timeout=120)
    return f"llama-cpp-python {out.stdout.strip() or '?'}"


def byte_vocab(n: int) -> tuple[list[str], list[bytes]]:
    """n token strings in GPT-2's byte-level spelling and the bytes each stands for: ids 0-255 the 256
    byte symbols in GPT-2's order (openai/gpt-2 encoder.py bytes_to_unicode), then one CJK Unified
    Ideograph, Hangul syllable or CJK Extension B character each."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    sym = dict(zip(bs, map(chr, cs), strict=True))
    raw = [bytes([b]) for b in bs]
    chars = [c for lo, hi in ((0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x20000, 0x2A6DF)) for c in range(lo, hi + 1)]
    raw += [chr(c).encode() for c in chars[:n - 256]]
    return ["".join(sym[b] for b in r) for r in raw[:n]], raw[:n]


LETTERS = [*range(32, 58), *range(64, 90)]  # the ids of A-Z and a-z in byte_vocab (GPT-2's too)


def letters_prompt(ids: list[int]) -> str:
    """The text of a prompt of letter ids (each in LETTERS): one letter a token."""
    return "".join(chr(i + ord("!")) for i in ids)


def llama_gguf(model_dir: str, precision: str) -> str:
    """The bench GPT-2 as GGUF ("fp32": F32, "int8": Q8_0) with byte_vocab's vocabulary, written once."""
    import json

    from fastlm.bench.peers.llamacpp_engine import write_gguf

    path = os.path.join(model_dir, f"gpt2-serve-{precision}.gguf")
    if not os.path.exists(path):
        with open(os.path.join(model_dir, "config.json")) as f:
            n = json.load(f)["vocab_size"]
        write_gguf(model_dir, path + ".partial", precision, tokens=byte_vocab(n)[0])
        os.replace(path + ".partial", path)
    return path


def llama_server(gguf: str, threads: int, n_ctx: int) -> ServerProcess:
    """llama-cpp-python's server on `gguf`: `threads` for decode and prompt, a context of n_ctx tokens,
    and interrupt_requests off (by default a new request interrupts the stream in flight: with it off,
    concurrent requests queue and each runs to the end, as the bench's clients expect)."""
    port = free_port()
    return ServerProcess([llama_python(), "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(threads),
                          "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx), "--n_batch", "512",
                          "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)], port,
                         env={"OMP_NUM_THREADS": str(threads)}, health="/v1/models")


def llama_check_greedy(url: str, model_dir: str, *, prompt_len: int = 8, new: int = 12, seed: int = 0) -> None:
    """Greedy completions from the llama.cpp server equal transformers' greedy tokens on the same
    GPT-2 (the text of the expected ids, decoded as llama-cpp-python decodes: UTF-8, errors ignored), for
    prompts of prompt_len and prompt_len + 1 letters (the server's n_ctx must hold prompt_len + 1 + new).
    Raises RuntimeError naming the first difference."""
    import random

    import httpx
    import torch
    import transformers as tf

    model = tf.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    _, raw = byte_vocab(model.config.vocab_size)
    eos = model.config.vocab_size - 1
    rng = random.Random(seed)
    for k in range(2):
        ids = [rng.choice(LETTERS) for _ in range(prompt_len + k)]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos)[0, len(ids):].tolist()
        out = out[:out.index(eos)] if eos in out else out
        want = b"".join(raw[t] for t in out).decode("utf-8", errors="ignore")
        r = httpx.post(url + "/v1/completions", json={"prompt": letters_prompt(ids), "max_tokens": new,
                                                      "temperature": 0}, timeout=300)
        r.raise_for_status()
        got = r.json()["choices"][0]["text"]
        if got != want:
            raise RuntimeError(f"llama.cpp server's greedy text differs from transformers': {got!r} != {want!r} "
                               f"(ids {out})")
