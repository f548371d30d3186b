#!/usr/bin/env bash
# Proves that csrc/cuda/*.cu compile with nvcc for sm_80 and sm_90, on a machine with
# no GPU and no CUDA build of torch: configures CMakeLists.txt with
# RSO_EXT_CUDA_KERNELS_ONLY=ON in a throw-away build directory and builds it.
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
echo "check_cuda_compile: OK: ${sources}compiled with $("${nvcc}" --version | grep -o 'release [0-9.]*') for sm_80;sm_90"
