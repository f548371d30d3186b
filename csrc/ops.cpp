// The rso_ext operator library: schemas (defined once, here) and the Python module
// `rso_ext._C`. Importing the module loads this shared object, whose static
// initialisers register the schemas below and the CPU/CUDA kernels in csrc/core/.
#include <Python.h>
#include <torch/library.h>

#include <pybind11/pybind11.h>

TORCH_LIBRARY(rso_ext, m) {
  // out[k] = sum_b cross_entropy(logits[k, b, :], target[b]) in float64, for logits
  // [K, B, C] (float32/float64) and int64 target [B]; returns float64 [K].
  m.def("candidate_cross_entropy(Tensor logits, Tensor target) -> Tensor");
}

namespace {

constexpr bool kCudaBuilt =
#ifdef WITH_CUDA
    true;
#else
    false;
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rso_ext compiled operators; call them through torch.ops.rso_ext or rso_ext.ops";
  m.def("cuda_built", [] { return kCudaBuilt; },
        "Whether the CUDA kernels were compiled into this build of the extension.");
}
