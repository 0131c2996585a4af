"""ONNX Runtime in the peers suite (`pip install 'fastlm[peers]'`): BERT-base only.

prepare() exports the saved BertModel (eager attention, through export.BertEncoder) with
torch.onnx.export's TorchScript exporter (dynamo=False: its graph is the one
onnxruntime.transformers.optimizer fuses; the dynamo graph leaves attention unfused), runs
`optimizer.optimize_model(model_type="bert")` on it (fused Attention, EmbedLayerNormalization,
SkipLayerNormalization, BiasGelu: the counts are kept in fusion.json and shown in the table), and
quantizes the optimized graph with `onnxruntime.quantization.quantize_dynamic` (int8 weights,
per-tensor dynamic int8 activations; QuantType.QInt8) for the int8 row. All of it once, into
<model_dir>/ort-<version>/. A session runs with intra_op_num_threads = the suite's threads and
every graph optimization on (ORT's default). GPT-2 decode is not run through ONNX Runtime (it
needs a KV-cache loop of its own; CTranslate2 and OpenVINO are the decode peers).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

from fastlm.bench.peers.base import Engine
from fastlm.bench.result import Skip

OPSET = 17  # LayerNormalization is an ONNX op from 17 on, so the exporter emits it whole


def converted_dir(model_dir: str) -> str:
    """Where prepare() leaves model_opt.onnx (the optimized export), model_opt_int8.onnx, fusion.json."""
    import onnxruntime

    return os.path.join(model_dir, f"ort-{onnxruntime.__version__}")


def export_bert(model_dir: str, out: str) -> dict:
    """Export, optimize and quantize the BertModel saved in `model_dir` into the directory `out`
    (created; must not exist). Returns the optimizer's fused-operator counts plus "layers"."""
    import torch
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic
    from onnxruntime.transformers import optimizer

    from fastlm.bench.peers.export import BertEncoder, bert_example

    m = BertEncoder(model_dir)
    c = m.config
    os.makedirs(out)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in [*names, "last_hidden_state"]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the cache's shape checks, traced as constants
        torch.onnx.export(m, bert_example(c.vocab_size), os.path.join(out, "model.onnx"), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False)
    opt = optimizer.optimize_model(os.path.join(out, "model.onnx"), model_type="bert",
                                   num_heads=c.num_attention_heads, hidden_size=c.hidden_size)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(os.path.join(out, "model_opt.onnx"))
    # the quantizer needs every tensor's type: symbolic shape inference knows the fused contrib ops
    quant_pre_process(os.path.join(out, "model_opt.onnx"), os.path.join(out, "model_opt_shaped.onnx"),
                      skip_optimization=True, skip_onnx_shape=True)
    quantize_dynamic(os.path.join(out, "model_opt_shaped.onnx"), os.path.join(out, "model_opt_int8.onnx"),
                     weight_type=QuantType.QInt8)
    os.remove(os.path.join(out, "model_opt_shaped.onnx"))
    os.remove(os.path.join(out, "model.onnx"))  # the optimized graphs are what runs (BERT-base: 418 MB less)
    fused["layers"] = c.num_hidden_layers
    with open(os.path.join(out, "fusion.json"), "w") as f:
        json.dump(fused, f)
    return fused


def session(path: str, threads: int):
    """An ONNX Runtime CPU session on `path` with `threads` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def feed(ids) -> dict:
    """The session's inputs for token ids `ids` (B, S): no padding, one segment."""
    import numpy as np

    x = ids.numpy().astype(np.int64)
    return {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}


class OnnxRuntime(Engine):
    name = "onnxruntime"
    title = "ONNX Runtime"
    module = "onnxruntime"
    install = "pip install 'fastlm[peers]'"
    prepares = True

    def isa_cap(self, isa):
        return {"env": {}, "forced": "no",
                "note": "not capped: its MLAS kernels are chosen from CPUID at start, with no setting to cap them"}

    def missing(self):
        why = super().missing()
        if why is None:
            try:
                import onnx  # noqa: F401  (torch.onnx.export writes through it)
            except ImportError:
                return f"onnx is not installed ({self.install})"
        return why

    def math(self, precision):
        return "int8 (quantize_dynamic)" if precision == "int8" else precision

    def prepare(self, work, model_dir):
        if work != "bert":
            return
        out = converted_dir(model_dir)
        if os.path.exists(os.path.join(out, "fusion.json")):
            return
        shutil.rmtree(out + ".partial", ignore_errors=True)
        try:
            export_bert(model_dir, out + ".partial")
        except Exception as e:  # an exporter or optimizer that cannot take this model: a skipped row
            raise Skip(f"export/optimize failed: {type(e).__name__}: {str(e)[:200]}") from None
        shutil.rmtree(out, ignore_errors=True)
        os.replace(out + ".partial", out)

    def runner(self, work, precision, model_dir, ids, threads):
        if work != "bert":
            raise Skip("ONNX Runtime runs the BERT row only (GPT-2 decode would need a KV-cache loop of its own)")
        d = converted_dir(model_dir)
        with open(os.path.join(d, "fusion.json")) as f:
            fused = json.load(f)
        s = session(os.path.join(d, "model_opt_int8.onnx" if precision == "int8" else "model_opt.onnx"), threads)
        att = f"{fused.get('Attention', 0)}/{fused['layers']} attention layers fused"
        self._ran_math = f"int8 (quantize_dynamic; {att})" if precision == "int8" else f"fp32 ({att})"
        x = feed(ids)
        return lambda: s.run(None, x), 1


ENGINE = OnnxRuntime()
