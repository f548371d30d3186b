#!/usr/bin/env bash
# Proves that csrc/cuda/*.cu compile with nvcc for sm_80 and sm_90, on a machine with
# no GPU and no CUDA build of torch: configures CMakeLists.txt with
# RSO_EXT_CUDA_KERNELS_ONLY=ON in a throw-away build directory and builds it. Then checks
# the syntax of the CUDA glue (csrc/cuda/*.cpp) with the host compiler against the
# installed torch's headers, the CUDA runtime headers, and empty stand-ins for the library
# headers a CPU machine lacks (cuBLAS, cuSPARSE, cuSOLVER): the glue's own code must parse
# and type-check; nothing is linked.
#
#   tools/check_cuda_compile.sh            # nvcc from $NVCC, else PATH, else /usr/local/cuda
#   NVCC=/path/to/nvcc tools/check_cuda_compile.sh
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

nvcc="${NVCC:-}"
if [[ -z "${nvcc}" ]]; then
  nvcc="$(command -v nvcc || true)"
fi
if [[ -z "${nvcc}" && -x /usr/local/cuda/bin/nvcc ]]; then
  nvcc=/usr/local/cuda/bin/nvcc
fi
if [[ -z "${nvcc}" ]]; then
  echo "check_cuda_compile: FAILED: nvcc not found (set NVCC or put nvcc on PATH)" >&2
  exit 2
fi

work_dir="$(mktemp -d "${TMPDIR:-/tmp}/rso_ext_cuda_check.XXXXXX")"
trap 'rm -rf "${work_dir}"' EXIT
build_dir="${work_dir}/build"

if ! cmake -S "${repo_root}" -B "${build_dir}" \
      -DRSO_EXT_CUDA_KERNELS_ONLY=ON -DCMAKE_CUDA_COMPILER="${nvcc}"; then
  echo "check_cuda_compile: FAILED: cmake configure (nvcc: ${nvcc})" >&2
  exit 1
fi
if ! cmake --build "${build_dir}" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"; then
  echo "check_cuda_compile: FAILED: nvcc could not compile csrc/cuda/*.cu" >&2
  exit 1
fi

sources="$(cd "${repo_root}" && ls csrc/cuda/*.cu | tr '\n' ' ')"

cuda_inc=""
for d in "${CUDA_HOME:-/nonexistent}/include" "$(dirname "$(readlink -f "${nvcc}")")/../include" \
         /usr/local/cuda/include; do
  if [[ -e "${d}/cuda_runtime_api.h" ]]; then
    cuda_inc="$(cd "${d}" && pwd)"
    break
  fi
done
if [[ -z "${cuda_inc}" ]]; then
  echo "check_cuda_compile: FAILED: no CUDA runtime headers (cuda_runtime_api.h); set CUDA_HOME" >&2
  exit 2
fi
stubs="${work_dir}/stubs"
mkdir -p "${stubs}/c10/cuda/impl"
echo '#pragma once' > "${stubs}/c10/cuda/impl/cuda_cmake_macros.h"
for h in cublas_v2.h cublasLt.h cusparse.h cusolverDn.h cusolver_common.h; do
  if [[ ! -e "${cuda_inc}/${h}" ]]; then
    printf '#pragma once\ntypedef struct cublasContext* cublasHandle_t;\ntypedef struct cublasLtContext* cublasLtHandle_t;\ntypedef struct cusparseContext* cusparseHandle_t;\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\ntypedef int cublasStatus_t;\ntypedef int cusparseStatus_t;\ntypedef int cusolverStatus_t;\n' > "${stubs}/${h}"
  fi
done
torch_includes="$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")"
glue="$(cd "${repo_root}" && ls csrc/cuda/*.cpp)"
for f in ${glue}; do
  # shellcheck disable=SC2086
  if ! "${CXX:-g++}" -std=c++20 -fsyntax-only -DWITH_CUDA ${torch_includes} \
        -I"${cuda_inc}" -I"${stubs}" -I"${repo_root}/csrc" "${repo_root}/${f}"; then
    echo "check_cuda_compile: FAILED: the CUDA glue ${f} does not compile" >&2
    exit 1
  fi
done

echo "check_cuda_compile: OK: ${glue//$'\n'/ } type-check against torch's CUDA headers"
echo "check_cuda_compile: OK: ${sources}compiled with $("${nvcc}" --version | grep -o 'release [0-9.]*') for sm_80;sm_90"
