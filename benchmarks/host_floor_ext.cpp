// Autograd nodes for benchmarks/host_profile.py's `floor` section: what a C++ node costs the host per fwd+bwd,
// against a Python autograd.Function, before a C++ launcher is worth building. NullNode and CallbackNode launch
// nothing; DriverNode runs triton_fa_rope's planned kernels of the tiny training call (the resident Gluon forward,
// the fused one-block backward) through the CUDA driver with the parameters `_driver_launch` packed: the floor of a
// C++ operator with C++ backward.
#include <dlfcn.h>
#include <torch/extension.h>

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "cuda.h"  // Triton's copy (its nvidia backend's include folder): no CUDA toolkit needed

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// A borrowed Python callable, kept for the process: a py::object destroyed at exit would outlive the interpreter.
PyObject* backward_callback = nullptr;

// q, k, v -> an allocation like q; backward hands the gradient back three times (as host_profile.Null).
struct NullNode : public torch::autograd::Function<NullNode> {
  static torch::Tensor forward(AutogradContext*, torch::Tensor q, torch::Tensor, torch::Tensor) {
    return torch::empty_like(q);
  }
  static variable_list backward(AutogradContext*, variable_list grads) { return {grads[0], grads[0], grads[0]}; }
};

// NullNode whose backward calls `backward_callback(grad)` under the GIL: the part of a Python backward's cost that
// taking the GIL on the engine's device thread adds, without the Python Function's machinery.
struct CallbackNode : public torch::autograd::Function<CallbackNode> {
  static torch::Tensor forward(AutogradContext*, torch::Tensor q, torch::Tensor, torch::Tensor) {
    return torch::empty_like(q);
  }
  static variable_list backward(AutogradContext*, variable_list grads) {
    {
      pybind11::gil_scoped_acquire gil;
      pybind11::handle callback(backward_callback);
      callback(grads[0]);
    }
    return {grads[0], grads[0], grads[0]};
  }
};

// One kernel's launch as `_driver_launch.Runner` packed it: per call, each tensor's address into its word of the
// parameter buffer and each tensor map's base, then cuLaunchKernel on the current stream.
struct PackedLaunch {
  CUfunction function = nullptr;
  unsigned grid[3] = {1, 1, 1}, block = 0, shared = 0;
  void** params = nullptr;
  std::vector<std::pair<uint64_t*, int>> words;  // (word address, argument index)
  std::vector<std::pair<CUtensorMap*, int>> maps;  // (tensor map address, argument index)
};

using launch_t = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              CUstream, void**, void**);
using replace_t = CUresult (*)(CUtensorMap*, void*);
launch_t cu_launch = nullptr;
replace_t cu_replace = nullptr;
PackedLaunch fwd_launch, bwd_launch;

void run(const PackedLaunch& k, const std::vector<torch::Tensor>& args) {
  for (const auto& [word, i] : k.words) *word = reinterpret_cast<uint64_t>(args[i].data_ptr());
  for (const auto& [map, i] : k.maps) TORCH_CHECK(cu_replace(map, args[i].data_ptr()) == CUDA_SUCCESS, "replace");
  auto device = args[0].device();
  auto stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
  TORCH_CHECK(cu_launch(k.function, k.grid[0], k.grid[1], k.grid[2], k.block, 1, 1, k.shared,
                        static_cast<CUstream>(stream), k.params, nullptr) == CUDA_SUCCESS, "cuLaunchKernel");
}

// q, k, v [B, H, N, D] (B = H = 1: layouts of size-1 dimensions aside), cos, sin -> o, as triton_fa_rope's training
// call at the shape the kernels were planned for; backward: dq, dk, dv by the fused backward kernel.
struct DriverNode : public torch::autograd::Function<DriverNode> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor cos, torch::Tensor sin) {
    auto B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
    auto o = torch::empty({B, N, H, D}, q.options()).transpose(1, 2);
    auto lse = torch::empty({B * H, N}, q.options().dtype(torch::kFloat32));
    auto qr = torch::empty({B, H, N, D}, q.options()), kr = torch::empty({B, H, N, D}, q.options());
    run(fwd_launch, {q, k, v, o, qr, kr, lse, cos, sin});  // the Gluon forward's tensor arguments, in order
    ctx->save_for_backward({qr, kr, v, o, lse, cos, sin});
    return o;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto dq = torch::empty_like(s[0]), dk = torch::empty_like(s[1]), dv = torch::empty_like(s[2]);
    // the fused backward's: q, k, v, o, do, lse, delta, dq scratch (lse: one block), dq, dk, dv, cos, sin
    run(bwd_launch, {s[0], s[1], s[2], s[3], grads[0], s[4], s[4], s[4], dq, dk, dv, s[5], s[6]});
    return {dq, dk, dv, torch::Tensor(), torch::Tensor()};
  }
};

PackedLaunch packed(pybind11::tuple spec) {
  // (function, grid, block, shared, params address, [(word address, arg index)], [(map address, arg index)])
  PackedLaunch k;
  k.function = reinterpret_cast<CUfunction>(spec[0].cast<uint64_t>());
  auto grid = spec[1].cast<std::vector<unsigned>>();
  for (size_t i = 0; i < grid.size() && i < 3; ++i) k.grid[i] = grid[i];
  k.block = spec[2].cast<unsigned>();
  k.shared = spec[3].cast<unsigned>();
  k.params = reinterpret_cast<void**>(spec[4].cast<uint64_t>());
  for (auto [addr, i] : spec[5].cast<std::vector<std::pair<uint64_t, int>>>())
    k.words.emplace_back(reinterpret_cast<uint64_t*>(addr), i);
  for (auto [addr, i] : spec[6].cast<std::vector<std::pair<uint64_t, int>>>())
    k.maps.emplace_back(reinterpret_cast<CUtensorMap*>(addr), i);
  return k;
}

}  // namespace

void set_driver_launches(pybind11::tuple fwd, pybind11::tuple bwd) {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW);
  TORCH_CHECK(lib != nullptr, "no libcuda.so.1");
  cu_launch = reinterpret_cast<launch_t>(dlsym(lib, "cuLaunchKernel"));
  cu_replace = reinterpret_cast<replace_t>(dlsym(lib, "cuTensorMapReplaceAddress"));
  TORCH_CHECK(cu_launch && cu_replace, "libcuda without cuLaunchKernel or cuTensorMapReplaceAddress");
  fwd_launch = packed(fwd);
  bwd_launch = packed(bwd);
}

torch::Tensor driver_apply(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(cu_launch != nullptr, "set_driver_launches(fwd, bwd) first");
  return DriverNode::apply(q, k, v, cos, sin);
}

torch::Tensor null_apply(torch::Tensor q, torch::Tensor k, torch::Tensor v) { return NullNode::apply(q, k, v); }

torch::Tensor callback_apply(torch::Tensor q, torch::Tensor k, torch::Tensor v) {
  TORCH_CHECK(backward_callback != nullptr, "set_backward_callback(fn) first");
  return CallbackNode::apply(q, k, v);
}

void set_backward_callback(pybind11::object fn) {
  Py_XDECREF(backward_callback);
  backward_callback = fn.inc_ref().ptr();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("null_apply", &null_apply, "NullNode: q, k, v -> empty_like(q)");
  m.def("callback_apply", &callback_apply, "CallbackNode: NullNode whose backward calls the Python callback");
  m.def("set_backward_callback", &set_backward_callback, "the callable CallbackNode's backward calls with grad");
  m.def("set_driver_launches", &set_driver_launches, "DriverNode's packed forward and backward launches");
  m.def("driver_apply", &driver_apply, "DriverNode: q, k, v, cos, sin -> o, the planned kernels through the driver");
}
