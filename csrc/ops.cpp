// The rso_ext operator library: schemas (defined once, here) and the Python module
// `rso_ext._C`. Importing the module loads this shared object, whose static
// initialisers register the schemas below and the kernels in csrc/core/ (any device),
// csrc/cpu/ and csrc/cuda/.
#include <Python.h>
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include "core/fused.h"
#include "core/program.h"

TORCH_LIBRARY(rso_ext, m) {
  // out[k] = sum_b cross_entropy(logits[k, b, :], target[b]) in float64, for logits
  // [K, B, C] (float32/float64) and int64 target [B]; returns float64 [K].
  m.def("candidate_cross_entropy(Tensor logits, Tensor target) -> Tensor");

  // The fused candidate evaluation of one unit sweep (csrc/core/fused.cpp, docs/design.md §2).
  // x / z: the swept layer's cached input and pre-activation over the pool; param: the
  // swept tensor; target [N]; the program (op 0 = swept layer, then the rest of the net)
  // as encoded in csrc/core/program.h; unit_kind 0 weight, 1 bias, 2 BN gamma, 3 BN beta
  // of op unit_op.
  //   K losses of weight k for candidate values [K] on minibatch batch [B]:
  m.def("fused_candidate_losses(Tensor x, Tensor z, Tensor param, Tensor target, "
        "int[] op_kinds, int[] op_params, float[] op_eps, Tensor?[] op_tensors, "
        "int unit_kind, int unit_op, int k, Tensor values, Tensor batch) -> Tensor");
  //   weights k0 .. k0+m-1 in order: evaluate values[i] on batches[i], choose (ties keep
  //   candidate 0), write the weight and keep z exact. Returns (chosen [m] int64: -1 where
  //   candidate 0's loss was not finite and the sweep stopped, -2 not visited; losses [m, K]).
  m.def("fused_sweep(Tensor x, Tensor(a!) z, Tensor(b!) param, Tensor target, "
        "int[] op_kinds, int[] op_params, float[] op_eps, Tensor?[] op_tensors, "
        "int unit_kind, int unit_op, int k0, Tensor values, Tensor batches) -> (Tensor, Tensor)");
  //   the ops of a program (any first op; BatchNorm with p[0] = 0 uses its running
  //   statistics) densely over x: the prefix forward that builds the caches:
  m.def("program_forward(Tensor x, int[] op_kinds, int[] op_params, float[] op_eps, "
        "Tensor?[] op_tensors) -> Tensor");
  //   set entry k of param to value and keep z exact:
  m.def("fused_set_weight(Tensor x, Tensor(a!) z, Tensor(b!) param, "
        "int[] op_kinds, int[] op_params, float[] op_eps, Tensor?[] op_tensors, "
        "int unit_kind, int unit_op, int k, float value) -> ()");
}

namespace {

constexpr bool kCudaBuilt =
#ifdef WITH_CUDA
    true;
#else
    false;
#endif

// The enumerator's name in program.h; nullptr past the last one. A switch without default, so
// that -Wall (-Wswitch) flags an enumerator added there and not here.
const char* op_kind_name(rso::OpKind kind) {
  using rso::OpKind;
  switch (kind) {
    case OpKind::Conv: return "Conv";
    case OpKind::Linear: return "Linear";
    case OpKind::BatchNorm: return "BatchNorm";
    case OpKind::ReLU: return "ReLU";
    case OpKind::AvgPool: return "AvgPool";
    case OpKind::MaxPool: return "MaxPool";
    case OpKind::GlobalAvgPool: return "GlobalAvgPool";
    case OpKind::Flatten: return "Flatten";
    case OpKind::Save: return "Save";
    case OpKind::Load: return "Load";
    case OpKind::Input: return "Input";
    case OpKind::Add: return "Add";
  }
  return nullptr;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rso_ext compiled operators; call them through torch.ops.rso_ext or rso_ext.ops";
  m.def("cuda_built", [] { return kCudaBuilt; },
        "Whether the CUDA kernels were compiled into this build of the extension.");
  m.def("_set_device_generic_paths", &rso::set_device_generic_paths,
        "Test switch: CPU tensors take the device-generic (CUDA backend's) code paths.");
  m.def("_device_generic_paths", &rso::device_generic_switch,
        "The test switch itself (the passes also go device-generic while a reduce group is set).");
  m.def("_set_reduce_group", &rso::set_reduce_group,
        "Over torch.distributed: the process group (by name) whose ranks the fused operators "
        "add their BatchNorm statistics and losses across; '' for one process.");
  m.def("_reduce_group", [] { return rso::reduce_group(); });
  m.def("left_out_budget", [] { return rso::fused::kLeftOutBudget; },
        "Most bytes of per-neuron states one fused_sweep call keeps (csrc/core/fused.h).");
  m.def("op_kinds", [] {
          pybind11::dict kinds;
          for (int64_t k = 0;; ++k) {
            const char* name = op_kind_name(static_cast<rso::OpKind>(k));
            if (name == nullptr) {
              return kinds;
            }
            kinds[name] = k;
          }
        },
        "The op kinds of the program encoding (enum rso::OpKind in csrc/core/program.h): "
        "enumerator name -> value.");
}
