// HostBuffer: page-locked host memory drawn from a pool's host budget, for
// bytes the owner copies out of device memory and back (the engine's swapped
// KV). Unlike a borrowed chunk it has no device address: it is plain host
// memory the device copies to and from asynchronously.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>

#include "pool.h"

namespace ellm {

class HostBuffer {
 public:
  // nbytes is rounded up to whole chunks (or a cached buffer's size, up to 1.5x).
  // OutOfMemory past the host budget (not counted as one if optional).
  HostBuffer(std::shared_ptr<Pool> pool, size_t nbytes, Tag tag, bool optional = false);
  ~HostBuffer();

  // Give the memory back to the pool; InvalidArgument while a view is live.
  void release();
  uintptr_t data_ptr() const;
  size_t nbytes() const { return nbytes_; }
  Tag tag() const { return tag_; }
  bool released() const;

  // Live torch views of [start, end): a view keeps the memory until it is freed.
  void add_view(size_t start, size_t end);
  void drop_view(size_t start, size_t end);

 private:
  std::shared_ptr<Pool> pool_;
  size_t nbytes_;
  const Tag tag_;
  mutable std::mutex mu_;
  uintptr_t addr_ = 0;  // 0 once released
  size_t views_ = 0;
};

}  // namespace ellm
