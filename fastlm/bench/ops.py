"""The ops suite of `fastlm bench`: one `*_cases(device, dtype)` factory per op, each case with
fastlm and the strongest baseline (torch's fused op, SDPA, cuBLAS, oneDNN ...) side by side, with
the FLOPs or bytes per call so the table shows TFLOP/s / GB/s against the measured ceiling.
Shapes follow the device: the full sweep on GPU, small shapes on CPU. The FFN and linear
factories live in fastlm/bench/ops_ffn.py; CASES below lists every factory of the suite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.bench.ops_ffn import ffn_cases, ffn_int8_cases, linear_prefill_cases
from fastlm.bench.result import Case, Skip, compile_or_skip


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
                          flops=flops, unit="TFLOP/s", x_name="sequence length (S)"))
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
                          bytes=(2 * M * N + N) * torch.finfo(dtype).bits // 8, unit="GB/s", x_name="rows (M)"))
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
            fn = compile_or_skip(lambda t: torch.softmax(t * 0.125, -1), device)
            return lambda: fn(x)

        cases.append(Case("softmax", "ops", f"R{R} N{N}", N, {"fastlm": fastlm_p, "torch": torch_p,
                                                             "torch_compile": compiled},
                          bytes=2 * R * N * torch.finfo(dtype).bits // 8, unit="GB/s",
                          x_name="row length (N)"))
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
            fn = compile_or_skip(lambda x, r: (F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-5), x + r), device)
            return lambda: fn(x, r)

        cases.append(Case("layer_norm", "ops", f"R{R} N{N} +residual", N,
                          {"fastlm": fastlm_p, "torch": torch_p, "torch_compile": compiled},
                          bytes=4 * R * N * eb, unit="GB/s", x_name="row length (N)"))
    return cases


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
                          bytes=2 * B * H * C * D * torch.finfo(dtype).bits // 8, unit="GB/s",
                          x_name="context length"))
    return cases


# name -> factory, in the order the suite runs them (a factory may give cases of several names)
CASES = {"attention": attention_cases, "softmax": softmax_cases, "decode_attention": decode_attention_cases,
         "bias_gelu": bias_gelu_cases, "ffn": ffn_cases, "ffn_int8": ffn_int8_cases,
         "linear_prefill": linear_prefill_cases, "layer_norm": layer_norm_cases}
# the case names (--only) the factories give
OPS = ("attention", "softmax", "decode_attention", "bias_gelu", "ffn_prefill", "ffn_decode", "ffn_decode_int8",
       "linear_prefill", "layer_norm")


def cases(device: str, dtype: torch.dtype) -> list[Case]:
    """Every case of the ops suite."""
    out: list[Case] = []
    for make in CASES.values():
        out += make(device, dtype)
    return out
