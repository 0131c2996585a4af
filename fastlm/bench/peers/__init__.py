"""The peers suite: fastlm against the CPU engines people already run.

    suite.py       which peers cases run, and run_peers (rows, the read bandwidth, the GPT-2 floor)
    workloads.py   the workloads (GPT-2 small decode, BERT-base forward): random-weight models
                   saved once, their inputs, case names, labels and units
    base.py        Engine: the interface every engine implements
    registry.py    the registered engines, one line each
    worker.py      python -m fastlm.bench.peers.worker: one engine, one workload, in its own process
    export.py      the transformers models as traceable modules (ONNX Runtime's and OpenVINO's exporters)
    <name>_engine.py   one module per engine (fastlm, transformers, CTranslate2, ONNX Runtime, OpenVINO
                   with its default math and with f32 math, llama.cpp)

This file imports nothing (see fastlm/bench/__init__.py).
"""
