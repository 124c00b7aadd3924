// Bodies of planned calls, replayed from C++ (`_replay.py` builds this with torch.utils.cpp_extension and registers
// the bodies): a body allocates its call's outputs and scratch and launches its recorded kernels through the CUDA
// driver, with each launch's parameters packed once by `_driver_launch` (copied here), so one call costs one
// crossing from Python instead of an allocation and a ctypes launch each.
//
// Slots: a body's tensors are numbered inputs first (as passed to `run`), then its allocations, then its constants
// (tensors it keeps, e.g. a 1-element stand-in for an argument the kernel does not read). Each launch writes the
// address of a slot into each pointer word and the base of each tensor map of its parameter buffer, then launches
// on the current stream of the inputs' device. The interpreter lock is held throughout: a body's buffers are
// written by one thread at a time.
#include <dlfcn.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstring>
#include <memory>
#include <unordered_map>

#include "cuda.h"  // Triton's copy (its nvidia backend's include folder): no CUDA toolkit needed

namespace {

using launch_t = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              CUstream, void**, void**);
using replace_t = CUresult (*)(CUtensorMap*, void*);
using error_t = CUresult (*)(CUresult, const char**);

struct Driver {
  launch_t launch = nullptr;
  replace_t replace = nullptr;
  error_t error_string = nullptr;
};

const Driver& driver() {
  static const Driver d = [] {
    Driver d;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    TORCH_CHECK(lib != nullptr, "attnhub replay: libcuda.so.1 not found");
    d.launch = reinterpret_cast<launch_t>(dlsym(lib, "cuLaunchKernel"));
    d.replace = reinterpret_cast<replace_t>(dlsym(lib, "cuTensorMapReplaceAddress"));
    d.error_string = reinterpret_cast<error_t>(dlsym(lib, "cuGetErrorString"));
    TORCH_CHECK(d.launch && d.replace && d.error_string, "attnhub replay: libcuda without the entry points needed");
    return d;
  }();
  return d;
}

void check(CUresult result, const char* what) {
  if (result == CUDA_SUCCESS) return;
  const char* text = "?";
  driver().error_string(result, &text);
  TORCH_CHECK(false, "attnhub replay: ", what, " failed: CUDA error ", static_cast<int>(result), " (", text, ")");
}

struct Launch {
  CUfunction function = nullptr;
  unsigned grid[3] = {1, 1, 1}, block = 0, shared = 0;
  std::unique_ptr<char[]> storage;  // the parameter buffer, its start 64-byte aligned (tensor maps need it)
  char* base = nullptr;
  std::vector<void*> params;                     // each kernel parameter's address in the buffer
  std::vector<std::pair<size_t, int>> pointers;  // (byte offset of a pointer word, slot)
  std::vector<std::pair<size_t, int>> maps;      // (byte offset of a tensor map, slot)
};

struct Allocation {
  std::vector<int64_t> sizes, strides;
  c10::ScalarType dtype;
};

struct Body {
  size_t inputs = 0;
  std::vector<Allocation> allocations;
  std::vector<torch::Tensor> constants;
  std::vector<Launch> launches;
  std::vector<int> returned;  // the slots `run` returns
};

std::unordered_map<int64_t, Body> bodies;
int64_t next_id = 0;

// spec: (function, grid, block, shared, buffer bytes from the aligned start, parameter offsets,
//        [(pointer word offset, slot)], [(tensor map offset, slot)])
Launch make_launch(const pybind11::tuple& spec) {
  Launch k;
  k.function = reinterpret_cast<CUfunction>(spec[0].cast<uint64_t>());
  auto grid = spec[1].cast<std::vector<unsigned>>();
  TORCH_CHECK(!grid.empty() && grid.size() <= 3, "attnhub replay: a grid has 1 to 3 axes");
  for (size_t i = 0; i < grid.size(); ++i) k.grid[i] = grid[i];
  k.block = spec[2].cast<unsigned>();
  k.shared = spec[3].cast<unsigned>();
  auto bytes = spec[4].cast<std::string>();
  k.storage.reset(new char[bytes.size() + 64]);
  auto start = reinterpret_cast<uintptr_t>(k.storage.get());
  k.base = reinterpret_cast<char*>((start + 63) / 64 * 64);
  std::memcpy(k.base, bytes.data(), bytes.size());
  for (auto offset : spec[5].cast<std::vector<size_t>>()) {
    TORCH_CHECK(offset < bytes.size(), "attnhub replay: a parameter past its buffer");
    k.params.push_back(k.base + offset);
  }
  k.pointers = spec[6].cast<std::vector<std::pair<size_t, int>>>();
  k.maps = spec[7].cast<std::vector<std::pair<size_t, int>>>();
  for (const auto& [offset, slot] : k.pointers) TORCH_CHECK(offset + 8 <= bytes.size(), "attnhub replay: a word");
  for (const auto& [offset, slot] : k.maps)
    TORCH_CHECK(offset % 64 == 0 && offset + 128 <= bytes.size(), "attnhub replay: a tensor map");
  return k;
}

}  // namespace

// -> the body's id. allocations: [(sizes, strides, a tensor of the dtype)]; launches: `make_launch`'s specs;
// returned: slots.
int64_t add(int64_t inputs,
            const std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, torch::Tensor>>& allocations,
            const std::vector<torch::Tensor>& constants, const std::vector<pybind11::tuple>& launches,
            const std::vector<int>& returned) {
  if (!launches.empty()) driver();
  Body body;
  body.inputs = static_cast<size_t>(inputs);
  for (const auto& [sizes, strides, like] : allocations)
    body.allocations.push_back({sizes, strides, like.scalar_type()});
  body.constants = constants;
  const int slots = static_cast<int>(body.inputs + body.allocations.size() + body.constants.size());
  for (const auto& spec : launches) {
    body.launches.push_back(make_launch(spec));
    for (const auto& [offset, slot] : body.launches.back().pointers)
      TORCH_CHECK(0 <= slot && slot < slots, "attnhub replay: a slot out of range");
    for (const auto& [offset, slot] : body.launches.back().maps)
      TORCH_CHECK(0 <= slot && slot < slots, "attnhub replay: a slot out of range");
  }
  for (int slot : returned) TORCH_CHECK(0 <= slot && slot < slots, "attnhub replay: a slot out of range");
  body.returned = returned;
  bodies.emplace(next_id, std::move(body));
  return next_id++;
}

void release(int64_t id) { bodies.erase(id); }

// -> the returned slots' tensors; empty (nothing launched) where an input is not 16-byte aligned, as every kernel
// was specialized for, or where the thread has no current CUDA context: the caller then runs its Python path.
std::vector<torch::Tensor> run(int64_t id, const std::vector<torch::Tensor>& inputs) {
  auto found = bodies.find(id);
  TORCH_CHECK(found != bodies.end(), "attnhub replay: no body ", id);
  const Body& body = found->second;
  TORCH_CHECK(inputs.size() == body.inputs, "attnhub replay: body ", id, " takes ", body.inputs, " inputs");
  for (const auto& t : inputs)
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return {};
  const auto device = inputs[0].device();
  c10::DeviceGuard guard(device);
  std::vector<torch::Tensor> slots(inputs.begin(), inputs.end());
  slots.reserve(inputs.size() + body.allocations.size() + body.constants.size());
  const auto options = inputs[0].options();
  for (const auto& a : body.allocations) slots.push_back(at::empty_strided(a.sizes, a.strides, options.dtype(a.dtype)));
  slots.insert(slots.end(), body.constants.begin(), body.constants.end());
  CUstream stream = nullptr;  // CPU tensors: only the tests' stand-in driver launches them
  if (!body.launches.empty() && device.is_cuda())
    stream = static_cast<CUstream>(c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle());
  bool first = true;
  for (const Launch& k : body.launches) {
    const Driver& d = driver();
    for (const auto& [offset, slot] : k.pointers)
      *reinterpret_cast<uint64_t*>(k.base + offset) = reinterpret_cast<uint64_t>(slots[slot].data_ptr());
    for (const auto& [offset, slot] : k.maps)
      check(d.replace(reinterpret_cast<CUtensorMap*>(k.base + offset), slots[slot].data_ptr()),
            "cuTensorMapReplaceAddress");
    auto result = d.launch(k.function, k.grid[0], k.grid[1], k.grid[2], k.block, 1, 1, k.shared, stream,
                           const_cast<void**>(k.params.data()), nullptr);
    if (first && result == CUDA_ERROR_INVALID_CONTEXT) return {};
    check(result, "cuLaunchKernel");
    first = false;
  }
  std::vector<torch::Tensor> out;
  out.reserve(body.returned.size());
  for (int slot : body.returned) out.push_back(slots[slot]);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add", &add, "register a body: inputs, allocations, constants, launches, returned slots -> its id");
  m.def("release", &release, "forget a body");
  m.def("run", &run, "run a body on its inputs -> its returned tensors (empty: run the Python path)");
  m.def("count", [] { return bodies.size(); }, "bodies registered");
}
