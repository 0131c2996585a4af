"""fastlm's Triton kernels, one op per file (installed as fastlm.kernels)."""

KERNEL_MODULES = ("attention", "softmax", "decode_attention", "ffn", "layer_norm")


def load_all() -> None:
    """Import every kernel module (each registers its AOT configurations)."""
    import importlib

    for name in KERNEL_MODULES:
        importlib.import_module(f"fastlm.kernels.{name}")
