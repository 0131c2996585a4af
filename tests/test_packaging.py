"""The repository never shadows an installed distribution (issue 18).

`python -m pytest`, `python -m fastlm` and `python -c` run from the repository root put the root
first on `sys.path`, ahead of site-packages. The top-level `kernels/` folder (fastlm's Triton
kernels, installed as `fastlm.kernels`) then met Hugging Face's `kernels` distribution, which
transformers imports when it is installed: every transformers model failed to import. These tests
run Python from the repository root, as a user does, and fail if any such shadowing comes back.
"""

import importlib.metadata
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_from_root(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python [args] -c code` with the repository root as the working directory (sys.path[0])."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_transformers_imports_its_hub_kernels_and_runs_a_model_from_the_root():
    # With Hugging Face's `kernels` installed (the dev extras bring it today), transformers imports
    # it; the repository's kernels/ folder must not answer that import.
    r = run_from_root("""
        import os
        import torch
        import fastlm, fastlm.kernels  # as the CLI and the bench do, before transformers' import
        import transformers.integrations.hub_kernels  # imported `kernels` and failed while we shadowed it
        from transformers import BertConfig, BertModel
        if transformers.utils.import_utils.is_kernels_available():
            import kernels
            ours = os.path.realpath(os.path.join(os.getcwd(), "kernels", "__init__.py"))
            assert os.path.realpath(kernels.__file__) != ours, kernels.__file__
            assert hasattr(kernels, "CUDAProperties"), dir(kernels)
        cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)
        torch.manual_seed(0)
        model = BertModel(cfg).eval()
        ids = torch.randint(0, 99, (2, 7))
        with torch.no_grad():
            out = model(ids).last_hidden_state
        assert out.shape == (2, 7, 32) and torch.isfinite(out).all()
        print("ok", transformers.utils.import_utils.is_kernels_available())
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", str(hf_kernels_installed())]


def test_an_installed_kernels_distribution_wins_over_the_folder(tmp_path):
    # Independent of what the registry ships today: a stand-in `kernels` distribution placed on
    # sys.path *after* the repository root (as site-packages is) is what `import kernels` gives,
    # submodules included. Without the step-aside in kernels/__init__.py the folder would win.
    pkg = tmp_path / "kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("MARKER = 'installed'\n")
    (pkg / "layers.py").write_text("NAME = 'installed.layers'\n")
    dist = tmp_path / "kernels-9.9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 9.9.9\n")
    r = run_from_root("""
        import os, sys
        assert os.path.realpath(sys.path[0] or os.getcwd()) == os.path.realpath(os.getcwd())  # the root comes first
        import kernels
        from kernels.layers import NAME
        print(kernels.MARKER, NAME, kernels.__file__)
    """, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    marker, name, path = r.stdout.split()
    assert (marker, name) == ("installed", "installed.layers")
    assert os.path.realpath(path) == os.path.realpath(pkg / "__init__.py")


def test_without_a_kernels_distribution_the_name_is_not_importable():
    # -S: no site-packages, so nothing named `kernels` is installed; the folder must not stand in.
    r = run_from_root(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        try:
            import kernels
        except ModuleNotFoundError as e:
            assert e.name == "kernels" and "kernels" not in sys.modules, e
            print("absent")
        else:
            print("imported", kernels.__file__)
    """, "-S")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "absent"


def test_fastlm_kernels_still_imports_as_the_subpackage():
    r = run_from_root("""
        import fastlm.kernels, fastlm.kernels.attention
        print(fastlm.kernels.KERNEL_MODULES[0], fastlm.kernels.attention.__name__)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["attention", "fastlm.kernels.attention"]


def top_level_importables(root: str) -> set[str]:
    """Names `import NAME` finds in `root`: packages (folders with __init__.py) and modules (*.py)."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "__init__.py")):
            names.add(entry)
        elif entry.endswith(".py"):
            names.add(entry[:-3])
    return names


def test_no_other_top_level_name_collides_with_an_installed_distribution():
    # The kind of fault, not the one name: every importable name at the repository root is either
    # fastlm itself, the kernels folder (which steps aside, tested above), or setup.py (run only
    # by the build), and none of the others is the top-level module of an installed distribution.
    installed = importlib.metadata.packages_distributions()
    ours = top_level_importables(ROOT)
    assert "fastlm" in ours and "kernels" in ours
    clash = {n: installed[n] for n in ours - {"fastlm", "kernels", "setup"} if n in installed}
    assert not clash, f"repository names shadow installed distributions: {clash}"
    assert set(installed.get("fastlm", ["fastlm"])) == {"fastlm"}
