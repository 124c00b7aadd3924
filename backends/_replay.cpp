// Bodies of planned calls, replayed from C++ (`_replay.py` builds this with torch.utils.cpp_extension and registers
// the bodies): a body allocates its call's outputs and scratch and launches its recorded kernels through the CUDA
// driver, with each launch's parameters packed once by `_driver_launch` (copied here), so one call costs one
// crossing from Python instead of an allocation and a ctypes launch each.
//
// Slots: a body's tensors are numbered inputs first (as passed to `run`), then its allocations, then its constants
// (tensors it keeps, e.g. a 1-element stand-in for an argument the kernel does not read). Each launch writes the
// address of a slot (plus a byte offset: a view into an allocation) into each pointer word and the base of each
// tensor map of its parameter buffer, then launches
// on the current stream of the inputs' device. The interpreter lock is held throughout: a body's buffers are
// written by one thread at a time.
//
// Nothing here throws: an error is kept (`take_error`) and the call returns -1 or nothing, and `_replay.py` raises
// it. A C++ exception thrown out of this module crashed the process on the lent H100's image (torch 2.11).
#include <dlfcn.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
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

std::string error;  // the last call's error, for `take_error`

bool fail(const std::string& what) {
  error = "attnhub replay: " + what;
  return false;
}

// nullptr (and `error` set) where libcuda or an entry point is missing.
const Driver* driver() {
  static const Driver d = [] {
    Driver d;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib == nullptr) return d;
    d.launch = reinterpret_cast<launch_t>(dlsym(lib, "cuLaunchKernel"));
    d.replace = reinterpret_cast<replace_t>(dlsym(lib, "cuTensorMapReplaceAddress"));
    d.error_string = reinterpret_cast<error_t>(dlsym(lib, "cuGetErrorString"));
    return d;
  }();
  if (d.launch && d.replace && d.error_string) return &d;
  fail("libcuda.so.1 not found, or without cuLaunchKernel, cuTensorMapReplaceAddress and cuGetErrorString");
  return nullptr;
}

bool check(const Driver& d, CUresult result, const char* what) {
  if (result == CUDA_SUCCESS) return true;
  const char* text = "?";
  d.error_string(result, &text);
  return fail(std::string(what) + " failed: CUDA error " + std::to_string(static_cast<int>(result)) + " (" + text +
              ")");
}

struct Launch {
  CUfunction function = nullptr;
  unsigned grid[3] = {1, 1, 1}, block = 0, shared = 0;
  std::unique_ptr<char[]> storage;  // the parameter buffer, its start 64-byte aligned (tensor maps need it)
  char* base = nullptr;
  std::vector<void*> params;                     // each kernel parameter's address in the buffer
  std::vector<std::tuple<size_t, int, int64_t>> pointers;  // (byte offset of a pointer word, slot, bytes into it)
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
//        [(pointer word offset, slot, bytes into the slot)], [(tensor map offset, slot)])
bool make_launch(const pybind11::tuple& spec, int slots, Launch& k) {
  k.function = reinterpret_cast<CUfunction>(spec[0].cast<uint64_t>());
  auto grid = spec[1].cast<std::vector<unsigned>>();
  if (grid.empty() || grid.size() > 3) return fail("a grid has 1 to 3 axes");
  for (size_t i = 0; i < grid.size(); ++i) k.grid[i] = grid[i];
  k.block = spec[2].cast<unsigned>();
  k.shared = spec[3].cast<unsigned>();
  auto bytes = spec[4].cast<std::string>();
  k.storage.reset(new char[bytes.size() + 64]);
  auto start = reinterpret_cast<uintptr_t>(k.storage.get());
  k.base = reinterpret_cast<char*>((start + 63) / 64 * 64);
  std::memcpy(k.base, bytes.data(), bytes.size());
  for (auto offset : spec[5].cast<std::vector<size_t>>()) {
    if (offset >= bytes.size()) return fail("a parameter past its buffer");
    k.params.push_back(k.base + offset);
  }
  k.pointers = spec[6].cast<std::vector<std::tuple<size_t, int, int64_t>>>();
  k.maps = spec[7].cast<std::vector<std::pair<size_t, int>>>();
  for (const auto& [offset, slot, delta] : k.pointers)
    if (offset + 8 > bytes.size() || slot < 0 || slot >= slots) return fail("a pointer word past its buffer or slots");
  for (const auto& [offset, slot] : k.maps)
    if (offset % 64 != 0 || offset + 128 > bytes.size() || slot < 0 || slot >= slots)
      return fail("a tensor map misaligned, or past its buffer or slots");
  return true;
}

}  // namespace

// -> the body's id (-1: an error, see `take_error`). allocations: [(sizes, strides, a tensor of the dtype)];
// launches: `make_launch`'s specs; returned: slots.
int64_t add(int64_t inputs,
            const std::vector<std::tuple<std::vector<int64_t>, std::vector<int64_t>, torch::Tensor>>& allocations,
            const std::vector<torch::Tensor>& constants, const std::vector<pybind11::tuple>& launches,
            const std::vector<int>& returned) {
  error.clear();
  if (!launches.empty() && driver() == nullptr) return -1;
  Body body;
  body.inputs = static_cast<size_t>(inputs);
  for (const auto& [sizes, strides, like] : allocations)
    body.allocations.push_back({sizes, strides, like.scalar_type()});
  body.constants = constants;
  const int slots = static_cast<int>(body.inputs + body.allocations.size() + body.constants.size());
  for (const auto& spec : launches) {
    body.launches.emplace_back();
    if (!make_launch(spec, slots, body.launches.back())) return -1;
  }
  for (int slot : returned)
    if (slot < 0 || slot >= slots) return fail("a returned slot out of range"), -1;
  body.returned = returned;
  bodies.emplace(next_id, std::move(body));
  return next_id++;
}

void release(int64_t id) { bodies.erase(id); }

// -> the returned slots' tensors; empty (nothing launched) where an input is not 16-byte aligned, as every kernel
// was specialized for, or where the thread has no current CUDA context: the caller then runs its Python path; empty
// with an error kept (`take_error`) for a bad call or a failed launch.
std::vector<torch::Tensor> run(int64_t id, const std::vector<torch::Tensor>& inputs) {
  error.clear();
  auto found = bodies.find(id);
  if (found == bodies.end()) return fail("no body " + std::to_string(id)), std::vector<torch::Tensor>{};
  const Body& body = found->second;
  if (inputs.size() != body.inputs)
    return fail("body " + std::to_string(id) + " takes " + std::to_string(body.inputs) + " inputs"),
           std::vector<torch::Tensor>{};
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
  const Driver* d = body.launches.empty() ? nullptr : driver();  // found when the body was added
  for (const Launch& k : body.launches) {
    for (const auto& [offset, slot, delta] : k.pointers)
      *reinterpret_cast<uint64_t*>(k.base + offset) = reinterpret_cast<uint64_t>(slots[slot].data_ptr()) + delta;
    for (const auto& [offset, slot] : k.maps)
      if (!check(*d, d->replace(reinterpret_cast<CUtensorMap*>(k.base + offset), slots[slot].data_ptr()),
                 "cuTensorMapReplaceAddress"))
        return {};
    auto result = d->launch(k.function, k.grid[0], k.grid[1], k.grid[2], k.block, 1, 1, k.shared, stream,
                            const_cast<void**>(k.params.data()), nullptr);
    if (first && result == CUDA_ERROR_INVALID_CONTEXT) return {};
    if (!check(*d, result, "cuLaunchKernel")) return {};
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
  m.def("take_error", [] { return std::exchange(error, std::string()); }, "the last error (empty: none), cleared");
}
