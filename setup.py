"""Build mmcore and its extension mmcore._C.

C++ sources (csrc/ops.cpp, csrc/cpu/*.cpp, and csrc/cuda/*.cpp: the CUDA ops' schemas, argument
checks and CPU emulation) are always built, with OpenMP and -O3 (no -march=native: the binary
must run on other CPUs; kernels pick their vector ISA at run time).  The CUDA kernels
(csrc/cuda/*.cu) are added, and the .cpp files compiled with -DMMCORE_WITH_CUDA (which registers
their CUDA implementations), when torch is a CUDA build and nvcc is found, or when MMCORE_CUDA=1;
MMCORE_CUDA=0 skips them.  The kernels need sm_80+ (bf16 MMA, cp.async): TORCH_CUDA_ARCH_LIST
(e.g. "8.0;9.0") is honoured by torch's build helpers, else the visible GPU's arch is used.
Install against the torch already present (docs/install.md; extras: EXTRAS below):

    pip install --no-build-isolation --use-pep517 -e .
    pip install --no-build-isolation '.[all]'
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))


def _requirements(name):
    with open(os.path.join(ROOT, name)) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def _want_cuda():
    flag = os.environ.get("MMCORE_CUDA")
    if flag is not None:
        return flag == "1"
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and has_nvcc


def _extension():
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    cpp = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cpp += sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    cpp = [rel(os.path.join(ROOT, "csrc", "ops.cpp"))] + [rel(p) for p in cpp]
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    link = ["-fopenmp"]
    if _want_cuda():
        cu = [rel(p) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        nvcc = ["-O3", "--use_fast_math", "-std=c++17", "--expt-relaxed-constexpr"]
        return CUDAExtension("mmcore._C", cpp + cu, include_dirs=[os.path.join(ROOT, "csrc")],
                             extra_compile_args={"cxx": cxx + ["-DMMCORE_WITH_CUDA"],
                                                 "nvcc": nvcc + ["-DMMCORE_WITH_CUDA"]},
                             extra_link_args=link)
    return CppExtension("mmcore._C", cpp, include_dirs=[os.path.join(ROOT, "csrc")],
                        extra_compile_args={"cxx": cxx}, extra_link_args=link)


# pip install 'mmcore[<extra>]' (mmcore/_optional.py names the extra a missing package is in;
# ./bootstrap.sh installs all,test,docs from here)
EXTRAS = {
    "hf": _requirements("requirements-hf.txt"),  # mmcore.patch, peft interop, mmcore read
    "triton": ["triton"],                        # the Triton backends
    "train": ["tqdm", "rich", "scikit-learn", "pillow", "pyyaml"],  # mmcore train, its data
    "vision": ["pillow"],                        # images: mmcore read --image
    "plot": ["matplotlib"],                      # mmcore read --explain, training curves
    "test": ["pytest", "packaging"],
    "docs": ["mkdocs==1.6.1"],                   # the docs site (built --strict in CI)
}
EXTRAS["all"] = sorted({r for k in ("hf", "triton", "train", "vision", "plot") for r in EXTRAS[k]})

setup(
    name="mmcore",
    version="0.1.0",
    description="Sliding-window, cross-modal and LoRA kernels for long-document multimodal models",
    python_requires=">=3.10",
    packages=["mmcore", "mmcore.ops", "mmcore.ops.backends", "mmcore.ops.reference",
              "mmcore.nn", "mmcore.patch", "mmcore.models", "mmcore.train", "mmcore.train.tasks",
              "mmcore.kernels", "mmcore.benchmarks"],
    package_dir={"mmcore.kernels": "kernels", "mmcore.benchmarks": "benchmarks"},
    package_data={"mmcore.ops": ["dispatch_tables/*.json"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.4", "safetensors", "numpy"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mmcore=mmcore.cli:main"]},
)
