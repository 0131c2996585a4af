"""The generate cases of `fastlm bench` (run with the models suite): GPT-2 greedy decoding, fastlm
(static cache, CUDA graph on GPU) against transformers' generate, before and after
fastlm.optimize, and transformers' static cache + torch.compile (GPU only). tok/s of new tokens.
In bfloat16 on CPU the case also times fastlm in float32 on the same (bf16-valued) weights
(provider fastlm_fp32): the bf16 decode's speed-up over fp32 reads off one case.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import fastlm
from fastlm.bench.result import Case, Skip


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
    fp32_twin = not gpu and dtype == torch.bfloat16  # bf16 decode against fp32 on the same weights

    def models(size):
        cache = caches.setdefault(size, {})
        if "hf" not in cache:
            torch.manual_seed(0)
            cfg = tf.GPT2Config(**sizes[size])
            cfg._attn_implementation = "sdpa"
            cache["hf"] = tf.GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()
            cache["fastlm"] = fastlm.from_pretrained(cache["hf"], dtype=dtype, device=device)
            cache["optimized"] = fastlm.optimize(copy.deepcopy(cache["hf"]))
        if fp32_twin and "fastlm_fp32" not in cache:
            cache["fastlm_fp32"] = fastlm.from_pretrained(cache["hf"], dtype=torch.float32, device=device)
        return cache

    cases = []
    for size, B, P, N in shapes:
        ids = torch.randint(0, 50000, (B, P), generator=torch.Generator().manual_seed(2)).to(device)

        def fastlm_p(ids=ids, N=N, size=size, which="fastlm"):
            m = models(size)[which]
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

        fp32 = ({"fastlm_fp32": lambda ids=ids, N=N, size=size: fastlm_p(ids, N, size, "fastlm_fp32")}
                if fp32_twin else {})
        cases.append(Case("gpt2_generate", "models", f"GPT-2 {size} B{B} prompt{P} new{N}", P,
                          {"fastlm": fastlm_p, **fp32, "hf_generate": hf_p,
                           "hf_generate_optimized": lambda ids=ids, N=N, size=size: hf_p(ids, N, "optimized", size),
                           "hf_static_compile": hf_static},
                          tokens=B * N, unit="tok/s", x_name="prompt length (tokens)"))
    return cases


# the case names (--only) this module gives
GENERATE_CASES = ("gpt2_generate",)


def cases(device: str, dtype: torch.dtype) -> list[Case]:
    """Every case of this module."""
    return generate_cases(device, dtype)
