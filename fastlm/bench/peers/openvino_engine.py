"""OpenVINO in the peers suite (`pip install 'fastlm[peers]'`: openvino, and nncf for the int8 rows).

prepare() converts the saved transformers model once with `openvino.convert_model` into
<model_dir>/ov-<version>/ (IR saved in fp32: save_model's default would store fp16 weights):
- BERT: export.BertEncoder; int8 = `nncf.quantize` (post-training static int8 of the MatMuls,
  model_type TRANSFORMER, calibrated on CALIB batches of random ids, as the workload's inputs are);
- GPT-2: export.GPT2Step (one prefill or decode step over an explicit KV cache) made stateful
  (openvino's MakeStateful transformation, as optimum-intel does: the KV cache stays inside the
  compiled model between calls, `reset_state()` clears it); the runner decodes greedily, one
  infer() per token. int8 = `nncf.compress_weights(mode=INT8_ASYM)`: int8 weights with per-channel
  scales and zero points, activations in the plugin's float math (optimum-cli's --weight-format int8).

The CPU plugin picks its float math itself: `INFERENCE_PRECISION_HINT` defaults to bf16 on a CPU with
AVX512_BF16 or AMX (so an "fp32" model runs bf16 math there) and to f32 elsewhere. Two engines share
this module: "openvino" compiles with the plugin's default, "openvino_f32" (openvino_f32_engine)
pins INFERENCE_PRECISION_HINT=f32; each row names the math the compiled model reports (ran_math).
"""

from __future__ import annotations

import json
import os
import warnings

from fastlm.bench.peers.base import Engine
from fastlm.bench.peers.workloads import BERT_S, GPT2_NEW
from fastlm.bench.result import Skip

CALIB = 8  # nncf.quantize calibration batches for BERT int8: (1, BERT_S) random ids each, seeds 1..CALIB
TYPE_NAMES = {"bf16": "bf16", "f32": "fp32", "f16": "fp16"}


def converted_dir(model_dir: str) -> str:
    """Where prepare() leaves {work}_{fp32,int8}.xml/.bin and info.json."""
    import openvino

    return os.path.join(model_dir, f"ov-{openvino.__version__.split('-')[0]}")


def _name(ports, names) -> None:
    for port, n in zip(ports, names, strict=True):
        port.get_tensor().set_names({n})


def convert_gpt2(model_dir: str):
    """The saved GPT-2 as a stateful OpenVINO model: inputs input_ids, position_ids ((1, T) int64),
    output logits (1, vocab) of the last position; the KV cache is its state."""
    import openvino as ov
    import torch
    from openvino._offline_transformations import apply_make_stateful_transformation

    from fastlm.bench.peers.export import GPT2Step

    m = GPT2Step(model_dir)
    c = m.config
    hd, n_kv = c.n_embd // c.n_head, 2 * c.n_layer
    shapes = [([1, -1], ov.Type.i64)] * 2 + [([1, c.n_head, -1, hd], ov.Type.f32)] * n_kv
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the cache's shape checks, traced as constants
        om = ov.convert_model(m, example_input=m.example(), input=shapes)
    _name(om.inputs, ["input_ids", "position_ids"] + [f"past.{i}" for i in range(n_kv)])
    _name(om.outputs, ["logits"] + [f"present.{i}" for i in range(n_kv)])
    apply_make_stateful_transformation(om, {f"past.{i}": f"present.{i}" for i in range(n_kv)})
    return om


def convert_bert(model_dir: str):
    """The saved BertModel as an OpenVINO model: inputs input_ids, attention_mask, token_type_ids
    ((B, S) int64), output last_hidden_state (B, S, hidden) fp32."""
    import openvino as ov
    import torch

    from fastlm.bench.peers.export import BertEncoder, bert_example

    m = BertEncoder(model_dir)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the cache's shape checks, traced as constants
        om = ov.convert_model(m, example_input=bert_example(m.config.vocab_size), input=[([-1, -1], ov.Type.i64)] * 3)
    _name(om.inputs, ["input_ids", "attention_mask", "token_type_ids"])
    _name(om.outputs, ["last_hidden_state"])
    return om


def bert_feed(ids) -> dict:
    import numpy as np

    x = ids.numpy().astype(np.int64)
    return {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}


def quantize(work: str, om, vocab: int):
    """The int8 model of `om`: nncf.compress_weights INT8_ASYM for GPT-2, nncf.quantize (static,
    CALIB random-id batches) for BERT."""
    import nncf
    import torch

    if work == "gpt2":
        return nncf.compress_weights(om, mode=nncf.CompressWeightsMode.INT8_ASYM)
    calib = [bert_feed(torch.randint(0, min(vocab, 30000), (1, BERT_S), generator=torch.Generator().manual_seed(s)))
             for s in range(1, CALIB + 1)]
    return nncf.quantize(om, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER, subset_size=CALIB)


def greedy(req, prompt, new: int) -> list[int]:
    """Greedy decode of `new` tokens after `prompt` (a (1, T) int64 array) on an infer request of the
    stateful GPT-2: one prefill, then one infer() per token."""
    import numpy as np

    req.reset_state()
    cur, n, out = prompt, 0, []
    for _ in range(new):
        req.infer({"input_ids": cur, "position_ids": np.arange(n, n + cur.shape[1], dtype=np.int64)[None]})
        tok = int(req.get_output_tensor(0).data[0].argmax())
        out.append(tok)
        n += cur.shape[1]
        cur = np.array([[tok]], dtype=np.int64)
    return out


def compile_model(path_or_model, threads: int, hint: str | None):
    """A CPU compiled model with `threads` inference threads, one stream, latency mode, and
    INFERENCE_PRECISION_HINT=`hint` where given (else the plugin's default)."""
    import openvino as ov

    cfg = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if hint:
        cfg["INFERENCE_PRECISION_HINT"] = hint
    return ov.Core().compile_model(path_or_model, "CPU", cfg)


def math_of(compiled) -> str:
    """The float math a compiled model runs: its INFERENCE_PRECISION_HINT as bf16 / fp32 / fp16."""
    t = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = t.get_type_name() if hasattr(t, "get_type_name") else str(t)
    return TYPE_NAMES.get(name, name)


class OpenVINO(Engine):
    module = "openvino"
    install = "pip install 'fastlm[peers]'"
    prepares = True

    def __init__(self, hint: str | None = None):
        self.hint = hint  # INFERENCE_PRECISION_HINT; None: the CPU plugin's default
        self.name = "openvino" if hint is None else f"openvino_{hint}"
        self.title = "OpenVINO" if hint is None else f"OpenVINO ({hint} math)"

    def version(self):
        v = super().version()
        return v.split("-")[0] if v else v

    def isa_cap(self, isa):
        # checked with the compiled GPT-2's runtime model (rt_info primitiveType), OpenVINO 2026.4 on
        # Zen 4: ONEDNN_MAX_CPU_ISA=AVX2 caps the plugin's oneDNN primitives (jit_avx2_f32) but not
        # its own JIT kernels (25 of 111 JIT nodes stay jit_avx512_f32), and with the default bf16
        # math compile_model fails ("Supported primitive descriptors list is empty ... Softmax")
        if self.hint is None:
            return {"env": {}, "forced": "skip",
                    "note": ("its default math is bf16 on this CPU, which an AVX2 CPU lacks, and it does not compile "
                             "under ONEDNN_MAX_CPU_ISA=AVX2: on an AVX2 CPU it runs f32 math, the OpenVINO (f32 math) "
                             "row")}
        return {"env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "forced": "partly",
                "note": ("ONEDNN_MAX_CPU_ISA=AVX2 caps its oneDNN primitives; the plugin's own JIT kernels stay "
                         "AVX-512 (25 of 111 JIT nodes of GPT-2)")}

    def math(self, precision):
        how = "the plugin's default math" if self.hint is None else f"INFERENCE_PRECISION_HINT={self.hint}"
        return f"{precision} ({how})"

    def prepare(self, work, model_dir):
        import openvino as ov

        if work not in ("gpt2", "bert"):  # other workloads (batched decode) have no runner here
            return
        out = converted_dir(model_dir)
        info_path = os.path.join(out, f"{work}.json")
        if os.path.exists(info_path):
            return
        os.makedirs(out, exist_ok=True)
        try:
            om = convert_gpt2(model_dir) if work == "gpt2" else convert_bert(model_dir)
            ov.save_model(om, os.path.join(out, f"{work}_fp32.xml"), compress_to_fp16=False)
        except Exception as e:  # a converter that cannot take this model: skipped rows
            raise Skip(f"convert_model failed: {type(e).__name__}: {str(e)[:200]}") from None
        info = {}
        try:
            with open(os.path.join(model_dir, "config.json")) as f:
                vocab = json.load(f)["vocab_size"]
            ov.save_model(quantize(work, om, vocab), os.path.join(out, f"{work}_int8.xml"), compress_to_fp16=False)
        except ImportError:
            info["int8"] = "nncf is not installed (pip install 'fastlm[peers]')"
        except Exception as e:
            info["int8"] = f"nncf failed: {type(e).__name__}: {str(e)[:200]}"
        with open(info_path + ".partial", "w") as f:
            json.dump(info, f)
        os.replace(info_path + ".partial", info_path)

    def runner(self, work, precision, model_dir, ids, threads):
        if work not in ("gpt2", "bert"):
            raise Skip(f"the peers suite runs OpenVINO on GPT-2 batch-1 decode and BERT only, not {work}")
        d = converted_dir(model_dir)
        with open(os.path.join(d, f"{work}.json")) as f:
            info = json.load(f)
        if precision in info:
            raise Skip(info[precision])
        cm = compile_model(os.path.join(d, f"{work}_{precision}.xml"), threads, self.hint)
        m = math_of(cm)
        hint = f"INFERENCE_PRECISION_HINT {m}" + (", the default" if self.hint is None else "")
        if precision == "fp32":
            self._ran_math = f"{m} ({'fp32 weights; ' if m != 'fp32' else ''}{hint})"
        elif work == "gpt2":
            self._ran_math = f"int8 weights, {m} math (nncf INT8_ASYM weight compression; {hint})"
        else:
            self._ran_math = f"int8 + {m} (nncf static int8 quantization; {hint})"
        req = cm.create_infer_request()
        if work == "gpt2":
            prompt = ids.numpy().astype("int64")

            def run():
                out = greedy(req, prompt, GPT2_NEW)
                assert len(out) == GPT2_NEW, len(out)
            return run, GPT2_NEW
        x = bert_feed(ids)
        return lambda: req.infer(x), 1


ENGINE = OpenVINO()
