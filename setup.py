"""Build fastlm and its extension fastlm._C.

Knobs (environment):
  FASTLM_SKIP_CUDA_BUILD=1   build the CPU ops only, even where CUDA is present.
  FASTLM_CUDA_ARCHS="8.0;9.0" compute capabilities to build for (PTX is added for the newest).
  MAX_JOBS=N                 parallel compile jobs (read by torch's ninja build).
The CPU-only build always works: CUDA sources are compiled only when torch itself is a
CUDA build and a CUDA toolkit is found.
"""

import glob
import os
import platform
import re

from setuptools import setup


def _cuda_gencode(archs: str) -> tuple[list[str], str]:
    """nvcc -gencode flags for "8.0;9.0" (PTX added for the newest), and a tag naming them that
    is a plain identifier ("sm80_sm90_ptx90"): it travels as -DFASTLM_CUDA_ARCHS=tag through gcc,
    nvcc and the ninja shell alike (no quotes, no commas: nvcc splits -D values on commas) and
    bindings.cpp turns it into a string."""
    caps = [c for c in re.split(r"[;, ]+", archs.strip()) if c]
    if not caps:
        raise ValueError(f"FASTLM_CUDA_ARCHS is empty or unparsable: {archs!r}")
    flags, names = [], []
    for cap in caps:
        num = cap.replace(".", "").replace("+PTX", "")
        if not num.isdigit():
            raise ValueError(f"FASTLM_CUDA_ARCHS: bad compute capability {cap!r} (expected e.g. 8.0;9.0)")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        names.append(f"sm{num}")
    newest = max((c.replace(".", "").replace("+PTX", "") for c in caps), key=int)
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags, "_".join(names) + f"_ptx{newest}"


def ext_modules():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    except ImportError:  # metadata-only invocations (e.g. egg_info without torch)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # -fno-trapping-math changes no result; it lets gcc if-convert the clamps in the CPU
    # GELU loops and vectorise them (about 5x on the CPU twins).
    cxx = ["-O3", "-std=c++17", "-fno-trapping-math"]
    if platform.system() == "Linux":
        cxx.append("-fopenmp")  # at::parallel_for is inline OpenMP in our translation units
    skip_cuda = os.environ.get("FASTLM_SKIP_CUDA_BUILD", "0") == "1"
    with_cuda = not skip_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        gencode, arch_names = _cuda_gencode(os.environ.get("FASTLM_CUDA_ARCHS", "8.0;9.0"))
        macros = [("FASTLM_WITH_CUDA", None), ("FASTLM_CUDA_ARCHS", arch_names)]
        # No --use_fast_math: erf/tanh must stay as exact as torch's.
        nvcc = ["-O3", "-std=c++17", "-lineinfo", "-Xptxas=-v", *gencode]
        ext = CUDAExtension(
            "fastlm._C",
            sources + cuda_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"] if platform.system() == "Linux" else [],
        )
    else:
        ext = CppExtension(
            "fastlm._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] if platform.system() == "Linux" else [],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


exts, cmdclass = ext_modules()

setup(
    packages=["fastlm", "fastlm.models", "fastlm.integrations", "fastlm.bench", "fastlm.bench.peers", "fastlm.kernels"],
    package_dir={"fastlm": "fastlm", "fastlm.kernels": "kernels"},
    package_data={"fastlm": ["py.typed"]},  # PEP 561: the public API is typed
    ext_modules=exts,
    cmdclass=cmdclass,
)
