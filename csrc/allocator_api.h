// The allocator registry (one CachingAllocator per device) and its C API.
#pragma once
#include <string>
#include <vector>

#include "caching_allocator.h"

#define ELLM_EXPORT __attribute__((visibility("default")))

enum { ELLM_OK = 0, ELLM_OUT_OF_MEMORY = 1, ELLM_INVALID_ARGUMENT = 2, ELLM_BACKEND_ERROR = 3 };

namespace ellm {

struct AllocatorConfig {
  std::string backend = "cuda";
  size_t budget_bytes = 0;       // 0: fraction of the device's memory
  double fraction = 1.0;
  size_t host_budget_bytes = 0;
  size_t chunk_bytes = 0;        // 0: max(granularity, 2 MiB)
  size_t granularity = 2 << 20;  // host backend only
};

using OomThrower = void (*)(const char* message);

void configure_allocators(const AllocatorConfig& c);
// The device's allocator, made on first use when create is set (else may be null).
std::shared_ptr<CachingAllocator> allocator_for(int device, bool create);
std::vector<int> active_devices();
// empty_cache() on the device's allocator (if any), then its pool's trim, unless a CUDA graph is being
// captured: trimming may free page-locked host buffers, which synchronizes. Bytes the cache freed.
size_t empty_cache_and_trim(int device);
void set_current_tag(Tag t);
Tag get_current_tag();
void set_oom_thrower(OomThrower f);

}  // namespace ellm
