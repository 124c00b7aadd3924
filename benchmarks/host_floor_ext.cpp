// Autograd nodes for benchmarks/host_profile.py's `floor` section: what a C++ node costs the host per fwd+bwd,
// against a Python autograd.Function, before a C++ launcher is worth building. NullNode and CallbackNode launch
// nothing; DriverNode runs triton_fa_rope's planned kernels of the tiny training call (the resident Gluon forward,
// the fused one-block backward) through the CUDA driver with the parameters `_driver_launch` packed: the floor of a
// C++ operator with C++ backward.
#include <dlfcn.h>
#include <pybind11/stl.h>
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

// The tiny training call's forward as triton_fa_rope runs it at the shape the kernels were planned for: q, k, v
// [B, H, N, D] (B = H = 1: layouts of size-1 dimensions aside), cos, sin -> o, lse, rotated q and k.
std::vector<torch::Tensor> driver_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                          const torch::Tensor& cos, const torch::Tensor& sin) {
  auto B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  auto o = torch::empty({B, N, H, D}, q.options()).transpose(1, 2);
  auto lse = torch::empty({B * H, N}, q.options().dtype(torch::kFloat32));
  auto qr = torch::empty({B, H, N, D}, q.options()), kr = torch::empty({B, H, N, D}, q.options());
  run(fwd_launch, {q, k, v, o, qr, kr, lse, cos, sin});  // the Gluon forward's tensor arguments, in order
  return {o, lse, qr, kr};
}

// Its fused backward: do, the forward's rotated q and k, v, o, lse, cos, sin -> dq, dk, dv.
std::vector<torch::Tensor> driver_backward(const torch::Tensor& d_o, const torch::Tensor& qr, const torch::Tensor& kr,
                                           const torch::Tensor& v, const torch::Tensor& o, const torch::Tensor& lse,
                                           const torch::Tensor& cos, const torch::Tensor& sin) {
  auto dq = torch::empty_like(qr), dk = torch::empty_like(kr), dv = torch::empty_like(v);
  // the kernel's tensor arguments: q, k, v, o, do, lse, delta, dq scratch (lse: one block), dq, dk, dv, cos, sin
  run(bwd_launch, {qr, kr, v, o, d_o, lse, lse, lse, dq, dk, dv, cos, sin});
  return {dq, dk, dv};
}

// Both as one C++ autograd node.
struct DriverNode : public torch::autograd::Function<DriverNode> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor cos, torch::Tensor sin) {
    auto out = driver_forward(q, k, v, cos, sin);
    ctx->save_for_backward({out[2], out[3], v, out[0], out[1], cos, sin});
    return out[0];
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto d = driver_backward(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
    return {d[0], d[1], d[2], torch::Tensor(), torch::Tensor()};
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
  auto f = packed(fwd), b = packed(bwd);
  void* lib = dlopen("libcuda.so.1", RTLD_NOW);
  TORCH_CHECK(lib != nullptr, "no libcuda.so.1");
  cu_launch = reinterpret_cast<launch_t>(dlsym(lib, "cuLaunchKernel"));
  cu_replace = reinterpret_cast<replace_t>(dlsym(lib, "cuTensorMapReplaceAddress"));
  TORCH_CHECK(cu_launch && cu_replace, "libcuda without cuLaunchKernel or cuTensorMapReplaceAddress");
  fwd_launch = f;
  bwd_launch = b;
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

// The same nodes behind operators of the dispatcher (torch.ops.attnhub_floor.*), as PyTorch's own operators are
// called, against pybind11's entry above.
TORCH_LIBRARY(attnhub_floor, m) {
  m.def("null(Tensor q, Tensor k, Tensor v) -> Tensor");
  m.def("driver(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnhub_floor, CompositeImplicitAutograd, m) {
  m.impl("null", [](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
    return NullNode::apply(q, k, v);
  });
  m.impl("driver", &driver_apply);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("null_apply", &null_apply, "NullNode: q, k, v -> empty_like(q)");
  m.def("callback_apply", &callback_apply, "CallbackNode: NullNode whose backward calls the Python callback");
  m.def("set_backward_callback", &set_backward_callback, "the callable CallbackNode's backward calls with grad");
  m.def("set_driver_launches", &set_driver_launches, "DriverNode's packed forward and backward launches");
  m.def("driver_apply", &driver_apply, "DriverNode: q, k, v, cos, sin -> o, the planned kernels through the driver");
  m.def("driver_forward", &driver_forward, "DriverNode's forward body: q, k, v, cos, sin -> o, lse, qr, kr");
  m.def("driver_backward", &driver_backward, "its backward body: do, qr, kr, v, o, lse, cos, sin -> dq, dk, dv");
}
