"""fastlm's Triton kernels, one op per file (installed as fastlm.kernels)."""

from fastlm.backend import check_interpreter

check_interpreter()  # under TRITON_INTERPRET=1: triton < 3.8 with numpy >= 2.4 is refused, naming the fix

KERNEL_MODULES = ("attention", "softmax", "decode_attention", "ffn", "layer_norm")


def load_all() -> None:
    """Import every kernel module (each registers its AOT configurations)."""
    import importlib

    for name in KERNEL_MODULES:
        importlib.import_module(f"fastlm.kernels.{name}")
