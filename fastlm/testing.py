"""Verification helpers shared by tests/ and bench/device_check.sh.

- `close_2x`: the low-precision rule of DESIGN.md: a kernel's error against the fp32
  reference may be at most 2x plain torch's error in the same dtype, plus a floor.
- `nvcc_compile`: compile one plain-CUDA source with `-Xptxas -v` and read back
  registers, stack and spill bytes per kernel.
- `accuracy_texts`: a deterministic set of texts (one-word to ~100 tokens) for embedding accuracy
  checks of quantized models.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor

FLOORS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def close_2x(out: Tensor, ref32: Tensor, plain: Tensor, *, floor: float | None = None, what: str = "") -> None:
    """Assert out's error vs ref32 <= 2 x plain's error vs ref32 + floor (floor by dtype)."""
    assert out.shape == ref32.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    assert torch.isfinite(out).all(), f"{what}: output has Inf/NaN"
    floor = FLOORS[out.dtype] if floor is None else floor
    err, base = max_err(out, ref32), max_err(plain, ref32)
    assert err <= 2 * base + floor, f"{what}: error {err:.3g} > 2 x torch's {base:.3g} + {floor:.3g}"


def ffn_weights(d: int, d_ff: int, dtype: torch.dtype, device="cpu") -> list[Tensor]:
    """Random (w1, b1, w2, b2) in nn.Linear layout, scaled so activations stay O(1)."""
    w1 = torch.randn(d_ff, d, device=device) * d**-0.5
    w2 = torch.randn(d, d_ff, device=device) * d_ff**-0.5
    return [t.to(dtype) for t in (w1, torch.randn(d_ff, device=device), w2, torch.randn(d, device=device))]


def check_ffn(out: Tensor, x, w1, b1, w2, b2, act: str, residual, *, fp32_floor: float, what: str = "ffn") -> None:
    """The 2x rule for an FFN output: reference in fp64 (fp32 inputs) or fp32, against plain
    torch (linear, gelu, linear, add) in the input dtype."""
    import torch.nn.functional as F

    from fastlm import reference

    up = torch.float64 if x.dtype == torch.float32 else torch.float32
    expect = reference.ffn(*[t.to(up) for t in (x, w1, b1, w2, b2)], act, None if residual is None else residual.to(up))
    plain = F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh" if act == "gelu_tanh" else "none"), w2, b2)
    plain = plain if residual is None else plain + residual
    close_2x(out, expect, plain, floor=fp32_floor if x.dtype == torch.float32 else None, what=what)


def poison_(t: Tensor) -> Tensor:
    """Fill a buffer with NaN (or a huge int) so an output a kernel forgot to write shows."""
    return t.fill_(float("nan") if t.dtype.is_floating_point else torch.iinfo(t.dtype).max)


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def find_cuda_include() -> str | None:
    """The CUDA toolkit's include directory (the one with cuda_runtime.h)."""
    nvcc = find_nvcc()
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")):
            return os.path.join(c, "include")
    return None


@dataclass
class KernelReport:
    name: str
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int


def nvcc_compile(src: str, arch: str, include_dirs: tuple[str, ...] = ()) -> list[KernelReport]:
    """nvcc -c src for `arch` (e.g. "sm_90") with -Xptxas -v; returns one report per kernel.
    Raises RuntimeError with nvcc's output when the compile fails."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set NVCC or put it on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", src, "-o", os.path.join(tmp, "k.o"), f"-arch={arch}", "-std=c++17", "-O3",
               "-Xptxas", "-v", *[f"-I{d}" for d in include_dirs]]
        res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src} ({arch}):\n{log}")
    reports, name = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            stack, st, ld = map(int, m.groups())
            reports.append(KernelReport(name, -1, stack, st, ld))
        m = re.search(r"Used (\d+) registers", line)
        if m and reports and reports[-1].registers == -1:
            reports[-1].registers = int(m.group(1))
    return reports


# -- texts for accuracy checks (quantization) ------------------------------------------------
SHORT_TEXTS = [  # one-word, punctuation and symbol texts: the hardest for int8_dynamic
          "Hi", "Thanks!", "x", "hello", "Hello", "hi", "Thanks", "thanks", "ok", "OK", "Yes", "no", "No.", "?", "!",
          ".", "...", "!!!", "?!", ",", "-", ":)", ":(", "a", "I", "the", "Bye", "bye!", "Cheers", "Wow", "wow!",
          "Sorry", "Please", "Help", "help!", "Why?", "What?", "Sure", "Great", "Nice", "cool", "lol", "42", "0",
          "2024", "3.14", "#1", "@home", "$5", "100%", "e-mail", "U.S.", "café", "naïve", "Tokyo", "Paris",
          "Python", "BERT", "GPU", "DNA", "COVID-19", "Mr.", "etc.", "ASAP", "FYI", "Hmm", "Ugh", "Oops", "Yay",
          "Congrats!", "Welcome", "Goodbye", "Good", "Bad", "maybe", "never", "always", "dog", "cat", "car",
          "love", "hate", "food", "water", "fire", "money", "time", "music", "Monday", "tomorrow", "yesterday",
          "breakfast", "unbelievable", "antidisestablishmentarianism", "zzz", "qwerty", "xyz", "abc",
          "The", "and", "of", "Z", "k", "é", "🙂", "—", "(", ")", "[CLS]", "'", '"', "#", "%", "&", "*"]
NOUNS = ["cat", "dog", "man", "woman", "child", "teacher", "doctor", "car", "house", "city", "river", "computer",
         "phone", "book", "movie", "song", "team", "market", "government", "company", "student", "garden", "train",
         "restaurant", "coffee", "pizza", "guitar", "violin", "ball", "mountain", "beach", "weather", "storm",
         "election", "vaccine", "network", "model", "password", "invoice", "meeting", "flight", "hotel", "bank"]
ADJS = ["big", "small", "red", "quick", "lazy", "happy", "sad", "new", "old", "expensive", "cheap", "beautiful",
        "broken", "noisy", "quiet", "strange", "famous", "local", "late", "early", "bright", "dark", "fast"]
VERBS = ["eats", "sees", "likes", "buys", "sells", "fixes", "plays", "reads", "writes", "visits", "builds",
         "watches", "finds", "loses", "cleans", "opens", "closes", "follows", "calls", "needs"]
PLACES = ["in the park", "at home", "on the train", "near the river", "in Paris", "at the office", "after lunch",
          "before dawn", "during the storm", "on Monday", "in 2019", "at the airport", "under the bridge"]
PHRASES = ["Thank you!", "Good morning", "See you soon", "How are you?", "Not bad", "I agree", "No way!",
           "Happy birthday!", "Well done.", "Call me", "Let's go", "What time is it?", "Order #1234", "Error 404",
           "Top 10 tips", "Meh.", "Good night!", "Of course", "I'm fine, thanks.", "Where is it?"]
TEMPLATES = [
    "The {a} {n} {v} the {n2}.",
    "A {n} {v} a {a} {n2} {p}.",
    "Why does the {n} {v2} the {n2}?",
    "My {n} is {a}.",
    "{N} {v} {n2}s {p}, but the {n3} is {a}.",
    "I think the {a} {n} {v} every {n2} {p}.",
    "Is the {n} {a}?",
    "How do I get a {a} {n} {p}?",
    "The {n} and the {n2} {v2} together {p}, while a {a} {n3} {v} the {n4} and nobody notices.",
    "{N}!",
    "{A} {n}",
    "{N}s {v2} {n2}s.",
]


def accuracy_texts(n: int = 1000, seed: int = 0) -> list[str]:
    """`n` distinct texts, deterministic for a seed and made without downloads: every one-word /
    punctuation text of SHORT_TEXTS first (\"Hi\", \"Thanks!\", \"x\", \"?\", ...), then PHRASES, then seeded
    words, short phrases and sentences of 1 to 6 templated clauses (a few tokens to ~100). The
    measuring stick of int8_dynamic's accuracy (bench/int8dyn_accuracy.py, tests/test_quantize.py)."""
    rng = random.Random(seed)
    out = list(dict.fromkeys(SHORT_TEXTS + PHRASES))
    seen = set(out)
    while len(out) < n:
        k = rng.random()
        if k < 0.1:  # short phrase from words
            out.append(" ".join(rng.choice(NOUNS + ADJS + VERBS) for _ in range(rng.randint(2, 4))))
        elif k < 0.15:  # single word from the lists, cased or punctuated
            w = rng.choice(NOUNS + ADJS + VERBS)
            out.append(rng.choice([w, w.capitalize(), w + "!", w + "?", w.upper()]))
        else:
            t = rng.choice(TEMPLATES)
            s = t.format(n=rng.choice(NOUNS), n2=rng.choice(NOUNS), n3=rng.choice(NOUNS), n4=rng.choice(NOUNS),
                         N=rng.choice(NOUNS).capitalize(), a=rng.choice(ADJS), A=rng.choice(ADJS).capitalize(),
                         v=rng.choice(VERBS), v2=rng.choice(VERBS).rstrip("s"), p=rng.choice(PLACES))
            reps = rng.choice([1, 1, 1, 2, 3, 6])
            if reps > 1:
                s = " ".join([s] + [t.format(n=rng.choice(NOUNS), n2=rng.choice(NOUNS), n3=rng.choice(NOUNS),
                                             n4=rng.choice(NOUNS), N=rng.choice(NOUNS).capitalize(),
                                             a=rng.choice(ADJS), A=rng.choice(ADJS).capitalize(),
                                             v=rng.choice(VERBS), v2=rng.choice(VERBS).rstrip("s"),
                                             p=rng.choice(PLACES)) for _ in range(reps - 1)])
            out.append(s)
        if out[-1] in seen:
            out.pop()
        else:
            seen.add(out[-1])
    return out[:n]
