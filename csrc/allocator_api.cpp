// The C entry points PyTorch's CUDAPluggableAllocator loads, one lazily made
// CachingAllocator (and Pool) per device, the per-thread tag, and the C-style
// twins (error code + message) that ctypes callers and tests use.
#include "allocator_api.h"

#include <array>
#include <cstdio>
#include <sys/types.h>

namespace ellm {

namespace {
constexpr int kMaxDevices = 64;

std::mutex registry_mu;
AllocatorConfig config;
// Never destroyed: statics are torn down after the CUDA driver has shut down, and releasing
// pools then would fail (PyTorch leaks its own allocator for the same reason).
auto& allocators = *new std::array<std::shared_ptr<CachingAllocator>, kMaxDevices>();
thread_local Tag current_tag = Tag::Activations;
thread_local std::string last_error;
OomThrower oom_thrower = nullptr;

// The device's allocator for a call that needs one already there (`what` names the call).
std::shared_ptr<CachingAllocator> existing_allocator(int device, const char* what) {
  auto a = allocator_for(device, false);
  if (!a) throw InvalidArgument(std::string(what) + " on device " + std::to_string(device) + ", which has no allocator");
  return a;
}

// Runs f, turning any exception into a code and last_error: nothing may unwind into C.
template <typename F>
int guarded(F&& f) {
  try {
    f();
    return ELLM_OK;
  } catch (const OutOfMemory& e) {
    last_error = e.what();
    return ELLM_OUT_OF_MEMORY;
  } catch (const InvalidArgument& e) {
    last_error = e.what();
    return ELLM_INVALID_ARGUMENT;
  } catch (const std::exception& e) {
    last_error = e.what();
    return ELLM_BACKEND_ERROR;
  }
}
}  // namespace

void configure_allocators(const AllocatorConfig& c) {
  if (c.backend != "cuda" && c.backend != "host")
    throw InvalidArgument("unknown allocator backend '" + c.backend + "': expected 'host' or 'cuda'");
  std::lock_guard<std::mutex> lock(registry_mu);
  for (auto& a : allocators)
    if (a && a->busy())
      throw InvalidArgument("the allocator has live allocations or CUDA graph pools; free them (and the graphs) "
                            "before configuring it again");
  // Idle allocators are dropped: the next allocation makes one with the new settings.
  for (auto& a : allocators) a.reset();
  config = c;
}

std::shared_ptr<CachingAllocator> allocator_for(int device, bool create) {
  if (device < 0 || device >= kMaxDevices)
    throw InvalidArgument("device index " + std::to_string(device) + " is out of range");
  std::lock_guard<std::mutex> lock(registry_mu);
  auto& a = allocators[device];
  if (!a && create) {
    auto backend = make_backend(config.backend, device, config.granularity);
    size_t chunk = config.chunk_bytes ? config.chunk_bytes : default_chunk_bytes(*backend);
    size_t budget = config.budget_bytes;
    if (budget == 0) budget = static_cast<size_t>(static_cast<double>(backend->capabilities().total_memory) *
                                                  config.fraction);
    a = std::make_shared<CachingAllocator>(
        std::make_shared<Pool>(std::move(backend), chunk, budget, config.host_budget_bytes));
    CachingAllocator::register_with_pool(a);
  }
  return a;
}

size_t empty_cache_and_trim(int device) {
  auto a = allocator_for(device, false);
  if (!a) return 0;
  size_t freed = a->empty_cache();
  if (!a->capturing()) a->pool()->trim();
  return freed;
}

std::vector<int> active_devices() {
  std::lock_guard<std::mutex> lock(registry_mu);
  std::vector<int> out;
  for (int d = 0; d < kMaxDevices; ++d)
    if (allocators[d]) out.push_back(d);
  return out;
}

void set_current_tag(Tag t) { current_tag = t; }
Tag get_current_tag() { return current_tag; }
void set_oom_thrower(OomThrower f) { oom_thrower = f; }

}  // namespace ellm

using namespace ellm;

extern "C" {

ELLM_EXPORT int torch_ellm_try_alloc(ssize_t size, int device, void* stream, void** out) {
  *out = nullptr;
  return guarded([&] {
    if (size < 0) throw InvalidArgument("negative allocation size " + std::to_string(size));
    *out = allocator_for(device, true)->allocate(static_cast<size_t>(size), reinterpret_cast<uintptr_t>(stream),
                                                 current_tag);
  });
}

ELLM_EXPORT int torch_ellm_try_free(void* ptr, int device) {
  return guarded([&] {
    existing_allocator(device, "free")->free(ptr);
  });
}

ELLM_EXPORT int torch_ellm_record_stream(void* ptr, int device, void* stream) {
  return guarded([&] {
    existing_allocator(device, "record_stream")->record_stream(ptr, reinterpret_cast<uintptr_t>(stream));
  });
}

ELLM_EXPORT const char* torch_ellm_last_error() { return last_error.c_str(); }

// Hooks for PyTorch's C++ pluggable-allocator API (torch_ellm/shim.py installs them on CUDA).
// PyTorch's record_stream hook passes no device: ask each device's allocator.
ELLM_EXPORT int torch_ellm_record_stream_any(void* ptr, void* stream) {
  return guarded([&] {
    for (int d : active_devices())
      if (allocator_for(d, false)->owns(ptr)) return allocator_for(d, false)->record_stream(ptr, reinterpret_cast<uintptr_t>(stream));
    throw InvalidArgument("record_stream on a pointer no torch_ellm allocator handed out");
  });
}

// A CUDA graph's private pool on `device` (PyTorch's beginAllocateToPool, endAllocateToPool,
// releasePool): see CachingAllocator. filter(context, stream) says which allocations are the graph's.
ELLM_EXPORT int torch_ellm_begin_allocate_to_pool(int device, uint64_t pool, CaptureFilter filter, void* context) {
  return guarded([&] { allocator_for(device, true)->begin_allocate_to_pool(pool, filter, context); });
}

ELLM_EXPORT int torch_ellm_end_allocate_to_pool(int device, uint64_t pool) {
  return guarded([&] {
    existing_allocator(device, "end_allocate_to_pool")->end_allocate_to_pool(pool);
  });
}

ELLM_EXPORT int torch_ellm_release_pool(int device, uint64_t pool) {
  return guarded([&] {
    if (auto a = allocator_for(device, false)) a->release_pool(pool);  // none: the pool holds nothing here
  });
}

ELLM_EXPORT int torch_ellm_empty_cache_all() {
  return guarded([&] {
    for (int d : active_devices()) empty_cache_and_trim(d);
  });
}

ELLM_EXPORT int torch_ellm_set_memory_fraction(double fraction, int device) {
  return guarded([&] {
    if (!(fraction > 0 && fraction <= 1)) throw InvalidArgument("memory fraction must be in (0, 1]");
    auto pool = allocator_for(device, true)->pool();
    pool->set_budget(static_cast<size_t>(static_cast<double>(pool->backend().capabilities().total_memory) * fraction));
  });
}

// PyTorch's entry points. PyTorch is C++ and lets exceptions from here reach
// Python; out of memory goes through the thrower enable() installs, which
// raises c10::OutOfMemoryError so users get torch.OutOfMemoryError.
ELLM_EXPORT void* torch_ellm_alloc(ssize_t size, int device, void* stream) {
  void* out = nullptr;
  int rc = torch_ellm_try_alloc(size, device, stream, &out);
  if (rc == ELLM_OK) return out;
  if (rc == ELLM_OUT_OF_MEMORY && oom_thrower) oom_thrower(last_error.c_str());
  throw std::runtime_error(last_error);
}

// For a torch.cuda.MemPool (mem_pool()): PyTorch's own caching allocator calls this and takes
// nullptr for out of memory, frees its cached blocks and retries before it raises.
ELLM_EXPORT void* torch_ellm_alloc_or_null(ssize_t size, int device, void* stream) {
  void* out = nullptr;
  int rc = torch_ellm_try_alloc(size, device, stream, &out);
  if (rc == ELLM_OK || rc == ELLM_OUT_OF_MEMORY) return out;
  throw std::runtime_error(last_error);
}

// Runs inside PyTorch's deleters, where an exception would terminate the process: a
// failure (a sticky CUDA error, a pointer that is not ours) is reported and the block kept.
ELLM_EXPORT void torch_ellm_free(void* ptr, ssize_t /*size*/, int device, void* /*stream*/) {
  if (torch_ellm_try_free(ptr, device) != ELLM_OK)
    std::fprintf(stderr, "torch_ellm: free of %p on device %d failed: %s\n", ptr, device, last_error.c_str());
}

}  // extern "C"
