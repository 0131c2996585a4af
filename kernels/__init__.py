"""fastlm's Triton kernels, one op per file (installed as fastlm.kernels).

This folder sits at the repository's top level, so wherever the repository root is on
`sys.path` (`python -m pytest`, `python -m fastlm`, `python -c` run from the root) Python would
find it as the top-level package `kernels`, shadowing Hugging Face's `kernels` distribution,
which transformers imports when it is installed. Imported under that name, this file steps
aside: it loads the installed `kernels` from the rest of `sys.path` in its place, or raises
ModuleNotFoundError as if the folder were not there. See docs/design.md ("Why kernels/ never
imports as `kernels`") and tests/test_packaging.py.
"""

if __name__ == "kernels":  # pragma: no cover - exercised in a subprocess by tests/test_packaging.py
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _defer_to_installed() -> None:
        root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            del sys.modules["kernels"]
            raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import system returns this entry once we finish
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise

    _defer_to_installed()
else:
    from fastlm.backend import check_interpreter

    check_interpreter()  # under TRITON_INTERPRET=1: triton < 3.8 with numpy >= 2.4 is refused, naming the fix

    KERNEL_MODULES = ("attention", "softmax", "decode_attention", "ffn", "layer_norm")

    def load_all() -> None:
        """Import every kernel module (each registers its AOT configurations)."""
        import importlib

        for name in KERNEL_MODULES:
            importlib.import_module(f"fastlm.kernels.{name}")
