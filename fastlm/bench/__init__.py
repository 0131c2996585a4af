"""What `fastlm bench` runs, as a library.

    result.py     the result model and timing: Case, Row, Ceilings, Result, Skip, Timing, timing,
                  measure_ceilings, format_value, JSON load / save. Imports no other module of the
                  package.
    ops.py        the ops suite: one `*_cases(device, dtype)` factory per op
    models.py     the models suite: BERT / GPT-2 forwards, BERT with padding, all-MiniLM-L6-v2
    generate.py   GPT-2 greedy generation (run with the models suite)
    peers/        the peers suite: fastlm against other engines on CPU, each engine in a process of
                  its own; one module per engine, registered in peers/registry.py
    runner.py     which cases a suite runs, and the run itself (a Result)
    report.py     markdown, speedups and compare, read from a Result
    plots.py      the PNGs (one per case, the peers' bars), read from a Result

Imports point one way: cli -> runner / report / plots -> suites -> result. This file imports nothing, so
importing one module of the package never drags in the others.
"""
