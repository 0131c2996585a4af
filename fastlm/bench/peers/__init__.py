"""The peers suite: fastlm against the CPU engines people already run.

    suite.py       which peers cases run, and run_peers (rows, the read bandwidth, the GPT-2 floor)
    workloads.py   the workloads (GPT-2 small decode, BERT-base forward): random-weight models
                   saved once, their inputs, case names, labels and units
    base.py        Engine: the interface every engine implements
    registry.py    the registered engines, one line each
    worker.py      python -m fastlm.bench.peers.worker: one engine, one workload, in its own process
    <name>_engine.py   one module per engine (fastlm, transformers, CTranslate2)

This file imports nothing (see fastlm/bench/__init__.py).
"""
