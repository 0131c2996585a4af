"""The shape of fastlm.bench (issue 26): the import graph has no cycle and the result model imports
no other module of the package; every registered peer engine implements the Engine interface; and a
peer that is not installed, or cannot prepare its model, becomes skipped rows with the reason,
never a crash of the run."""

import ast
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import fastlm
from fastlm.bench import report
from fastlm.bench.peers import registry, suite, worker
from fastlm.bench.peers.base import Engine
from fastlm.bench.peers.workloads import PEER_CASES
from fastlm.bench.result import Skip

PKG = Path(fastlm.__file__).parent / "bench"


def _modules() -> dict[str, Path]:
    """fastlm.bench's module names -> files."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = ["fastlm", *f.relative_to(PKG.parent).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastlm.bench modules `name` imports (anywhere in the file, functions included), and the
    engine modules the registry imports by name."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod where there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    if name == "fastlm.bench.peers.registry":
        found |= {f"fastlm.bench.peers.{m}" for m in registry.ENGINE_MODULES}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = _imports(name, path, modules)
        # importing a.b.c runs a.b's __init__ first: an edge to each enclosing package
        parts = name.split(".")
        edges |= {".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in modules} - {name}
        graph[name] = edges
    return graph


def test_the_import_graph_of_fastlm_bench_has_no_cycle():
    graph = _graph()
    assert "fastlm.bench.result" in graph and "fastlm.bench.peers.worker" in graph
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(n, path):
        state[n] = 1
        for m in sorted(graph[n]):
            assert state.get(m) != 1, "import cycle: " + " -> ".join([*path, n, m])
            if m not in state:
                visit(m, [*path, n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    # the package __init__ files import nothing, so importing one module never drags in the others
    assert graph["fastlm.bench"] == set() and graph["fastlm.bench.peers"] == {"fastlm.bench"}


def test_the_result_model_imports_no_other_bench_module():
    assert _graph()["fastlm.bench.result"] == {"fastlm.bench"}  # its package only (an empty __init__)
    code = ("import sys, fastlm.bench.result\n"
            "print([m for m in sys.modules if m.startswith('fastlm.bench')])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PKG.parent.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert sorted(eval(out.stdout)) == ["fastlm.bench", "fastlm.bench.result"]


def test_no_module_of_fastlm_bench_is_over_300_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert max(sizes.values()) <= 300, {n: s for n, s in sizes.items() if s > 300}


def test_every_registered_engine_implements_the_interface():
    engines = registry.engines()
    assert list(engines)[:3] == ["ctranslate2", "fastlm", "transformers"]  # the rows' order
    assert len(engines) == len(registry.ENGINE_MODULES)
    for mod, (name, e) in zip(registry.ENGINE_MODULES, engines.items(), strict=True):
        assert isinstance(e, Engine) and e.name == name and mod == f"{name}_engine", (mod, name)
        assert e.title and set(e.precisions) <= set(registry.PRECISIONS)
        assert type(e).runner is not Engine.runner, f"{name} does not implement runner()"
        if e.prepares:
            assert type(e).prepare is not Engine.prepare, f"{name} says it prepares but has no prepare()"
        why = e.missing()
        assert why is None or (isinstance(why, str) and why)
        v = e.version()
        assert (v is None) == (why is not None) and (v is None or isinstance(v, str))
        for p in e.precisions:
            assert isinstance(e.label(p), str) and e.label(p) and e.math(p).startswith(p)
    provs = registry.providers()
    assert len({p for p, _, _ in provs}) == len(provs)
    assert provs[:3] == [("ctranslate2", "ctranslate2", "fp32"), ("fastlm", "fastlm", "fp32"),
                         ("transformers", "transformers", "fp32")]


class _Fake(Engine):
    def runner(self, work, precision, model_dir, ids, threads):
        return (lambda: None), 1


class _Unconvertible(_Fake):
    prepares = True

    def prepare(self, work, model_dir):
        raise RuntimeError("this converter does not take GPT-2")


@pytest.fixture
def fake_engines(monkeypatch):
    """Register engines the way a new peer is registered: a module under fastlm.bench.peers
    defining ENGINE, and its name in registry.ENGINE_MODULES."""
    def add(mod: str, engine: Engine):
        m = types.ModuleType(f"fastlm.bench.peers.{mod}")
        m.ENGINE = engine
        monkeypatch.setitem(sys.modules, m.__name__, m)
        monkeypatch.setattr(registry, "ENGINE_MODULES", (*registry.ENGINE_MODULES, mod))
        registry.engines.cache_clear()

    yield add
    registry.engines.cache_clear()


def test_a_peer_that_is_missing_or_cannot_convert_gives_skipped_rows(fake_engines, monkeypatch):
    absent = type("Absent", (_Fake,), dict(name="absent", title="Absent", module="fastlm_no_such_engine_pkg",
                                          install="pip install absent"))()
    broken = type("Broken", (_Unconvertible,), dict(name="broken", title="Broken"))()
    fake_engines("absent_engine", absent)
    fake_engines("broken_engine", broken)
    assert absent.missing() == "fastlm_no_such_engine_pkg is not installed (pip install absent)"
    assert absent.version() is None
    calls = []

    def fake_worker(args, threads, timeout):  # the worker processes, answered here
        calls.append(args)
        if args[0] == "bandwidth":
            return {"gbs": [10.0]}
        if args[0] == "prepare":
            if "--engine" not in args:
                return {"dir": "/nonexistent"}
            name = args[args.index("--engine") + 1]
            if name == "broken":  # what the worker reports when prepare() raises
                return {"error": "worker exit 1: RuntimeError: this converter does not take GPT-2"}
            return {"dir": "/nonexistent"}
        return {"ms": [2.0], "cpu_ms": [3.0], "per": "call"}

    monkeypatch.setattr(suite, "_worker", fake_worker)
    for e in registry.engines().values():
        if e.optional and e.name not in ("absent", "broken"):
            monkeypatch.setattr(e, "missing", lambda: None)
    rows, read = suite.run_peers(list(PEER_CASES), rounds=1, calls=1, threads=1, size="tiny")
    assert read == 10.0
    by = {(r.case, r.provider): r for r in rows}
    assert set(by) == {(c, p) for c in PEER_CASES for p, _, _ in registry.providers()}
    for case in PEER_CASES:
        for p in ("absent", "absent_int8"):
            assert by[(case, p)].status == "skipped: fastlm_no_such_engine_pkg is not installed (pip install absent)"
            assert by[(case, p)].ms is None
        for p in ("broken", "broken_int8"):
            assert by[(case, p)].status.startswith("skipped: Broken could not prepare the model: worker exit 1")
        assert by[(case, "fastlm")].status == "ok" and by[(case, "fastlm")].ms == 2.0
    assert not any("absent" in a for a in calls)  # a missing engine never gets a process
    assert not any(a[0] == "time" and "broken" in a for a in calls)
    md = report.peers_markdown(rows, read)
    assert "| Absent | fp32 | skipped: fastlm_no_such_engine_pkg is not installed" in md


def test_the_worker_turns_a_missing_or_failing_engine_into_a_skip(fake_engines, monkeypatch, tmp_path, capsys):
    absent = type("Absent", (_Fake,), dict(name="absent", title="Absent", module="fastlm_no_such_engine_pkg"))()
    fake_engines("absent_engine", absent)
    assert worker.main(["time", "--work", "bert", "--engine", "absent", "--cache", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"skip": "fastlm_no_such_engine_pkg is not installed"}
    monkeypatch.setattr(worker.workloads, "prepare", lambda cache, work, size: str(tmp_path))
    with pytest.raises(Skip, match="not installed"):
        worker.prepare(str(tmp_path), "bert", "tiny", "absent")
    with pytest.raises(ValueError, match="engine must be one of ctranslate2, fastlm, transformers"):
        worker.engine("nope")
