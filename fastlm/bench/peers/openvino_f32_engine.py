"""OpenVINO with INFERENCE_PRECISION_HINT=f32: the same converted models as openvino_engine, compiled
with fp32 math, so that its rows compare with fp32 engines on CPUs where the plugin's default is bf16."""

from __future__ import annotations

from fastlm.bench.peers.openvino_engine import OpenVINO

ENGINE = OpenVINO(hint="f32")
