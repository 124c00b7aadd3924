// Autograd nodes that launch nothing, for benchmarks/host_profile.py's `floor` section: what a C++ node costs
// the host per fwd+bwd, against a Python autograd.Function, before a C++ launcher is worth building.
#include <torch/extension.h>

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

}  // namespace

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
}
