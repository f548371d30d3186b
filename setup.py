"""Build of rso_ext and its compiled operators rso_ext._C.

    pip install torch==2.13.0 numpy pybind11 ninja setuptools wheel
    pip install --no-build-isolation -e ".[test]"

The C++ (CPU) operators are always built. The CUDA kernels and their glue (csrc/cuda/*.cu and
csrc/cuda/*.cpp, compiled with -DWITH_CUDA) are added when the installed torch
was built with CUDA (torch.version.cuda is set) and a CUDA toolkit is found
(CUDA_HOME / nvcc). The environment variable RSO_EXT_CUDA overrides the detection:
RSO_EXT_CUDA=0 never builds them, RSO_EXT_CUDA=1 requires them (and fails if torch
has no CUDA or no toolkit is found). Set TORCH_CUDA_ARCH_LIST to choose the GPU
architectures (torch's default otherwise: those of the visible GPUs, or all).
"""

import glob
import os
import subprocess

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# torch >= 2.10 headers need C++20 (older torch compiles with it too).
CXX_STD = "-std=c++20"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda():
    flag = os.environ.get("RSO_EXT_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"RSO_EXT_CUDA must be 0 or 1 (or unset), got {flag!r}")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1" and not available:
        raise RuntimeError(
            "RSO_EXT_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r} (needs a CUDA build of torch), "
            f"CUDA_HOME={CUDA_HOME!r} (needs a CUDA toolkit with nvcc)"
        )
    return available


def _needs_shared_libstdcxx(path):
    """Whether the shared object ``path`` loads libstdc++ as a shared library (None when
    readelf is not there to tell)."""
    try:
        out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return "libstdc++.so" in out


class _BuildExtension(BuildExtension):
    """torch's BuildExtension, refusing an extension with libstdc++ linked in statically.

    A static copy of libstdc++ inside rso_ext._C, beside the shared one libtorch loads, breaks
    the streams that format error messages: the process crashed at the first number (seen on a
    GPU machine whose $CXX named a toolchain that linked its libstdc++ statically, 2026-12-04),
    or the numbers went missing (GCC 12 with -static-libstdc++). tests/test_ops.py checks the
    built extension's messages themselves.
    """

    def build_extensions(self):
        super().build_extensions()
        for ext in self.extensions:
            path = self.get_ext_fullpath(ext.name)
            if _needs_shared_libstdcxx(path) is False:
                os.remove(path)
                raise RuntimeError(
                    f"{path} has libstdc++ linked in statically (by the C++ compiler "
                    f"{(self.compiler.compiler_cxx or ['c++'])[0]!r} from $CXX or Python's "
                    "sysconfig, or by "
                    "-static-libstdc++ in LDFLAGS): beside libtorch's shared libstdc++ it "
                    "breaks error messages or crashes the process at the first one. Build "
                    "with a compiler that has a shared libstdc++ and without "
                    "-static-libstdc++, e.g. CXX=g++ pip install --no-build-isolation -e .")


def _extension():
    cpu_sources = ["csrc/ops.cpp"] + _rel(
        glob.glob(os.path.join(ROOT, "csrc", "core", "*.cpp"))
        + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    # no-trapping-math: lets GCC vectorise the branch-free exp/log loops (csrc/cpu/fast_math.h);
    # the results are the same IEEE operations
    extra_compile_args = {"cxx": ["-O3", "-fno-trapping-math", CXX_STD, "-fopenmp"]}
    kwargs = dict(
        name="rso_ext._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if _want_cuda():
        # kernels and glue share csrc/cuda/: their file names must differ in more than the
        # suffix (the build names objects after the source without it)
        cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))) + _rel(
            glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
        )
        extra_compile_args["nvcc"] = ["-O3", CXX_STD]
        return CUDAExtension(
            sources=cpu_sources + cuda_sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args=extra_compile_args,
            **kwargs,
        )
    return CppExtension(sources=cpu_sources, extra_compile_args=extra_compile_args, **kwargs)


setup(
    name="rso_ext",
    version="0.1.0",
    description="Random-search optimisation of neural networks with fused C++/CUDA candidate evaluation",
    packages=find_packages(include=["rso_ext", "rso_ext.*"]),
    include_package_data=True,
    package_data={"rso_ext": ["datasets/**/*"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension},
    python_requires=">=3.9",
    # torch stays unpinned here: a GPU machine brings its own CUDA build. README pins the CPU wheel.
    install_requires=["torch>=2.1", "numpy", "tqdm"],
    extras_require={
        # what the test suite imports (README's test command installs ".[test]")
        "test": ["pytest", "hypothesis", "matplotlib"],
        "plot": ["matplotlib"],
        "dfo": ["nevergrad"],
    },
    zip_safe=False,
)
