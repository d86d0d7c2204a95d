// VirtualTensor: an address range reserved once, with physical chunks mapped
// at its end as it grows. The address never changes; bytes survive resizes,
// moves to host memory and back.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "pool.h"

namespace ellm {

// std::mutex whose try_lock says "busy" to the thread that holds it, so the
// pool can pick borrowing victims without deadlocking on the caller's tensor.
class OwnedMutex {
 public:
  void lock() {
    if (owner_ == std::this_thread::get_id())
      throw InvalidArgument("VirtualTensor re-entered from its own thread (a consumer callback resizing the "
                            "tensor whose growth asked it to shrink?)");
    mu_.lock();
    owner_ = std::this_thread::get_id();
  }
  bool try_lock() {
    if (owner_ == std::this_thread::get_id() || !mu_.try_lock()) return false;
    owner_ = std::this_thread::get_id();
    return true;
  }
  void unlock() {
    owner_ = std::thread::id();
    mu_.unlock();
  }

 private:
  std::mutex mu_;
  std::atomic<std::thread::id> owner_{};
};

class VirtualTensor : public std::enable_shared_from_this<VirtualTensor> {
 public:
  VirtualTensor(std::shared_ptr<Pool> pool, size_t max_bytes, Tag tag);
  ~VirtualTensor();

  // may_deflate false: fail rather than ask other consumers to shrink or the pool to borrow.
  void resize(size_t nbytes, bool may_deflate = true);
  // resize() unless another thread holds the tensor: then false at once. For
  // consumer callbacks, which must never wait on a thread that may wait on them.
  bool try_resize(size_t nbytes);
  void release();

  uintptr_t data_ptr() const { return base_; }
  size_t nbytes() const;
  size_t mapped_bytes() const;
  size_t max_bytes() const { return max_bytes_; }
  size_t host_bytes() const;
  Tag tag() const { return tag_; }
  bool released() const { return released_; }
  std::shared_ptr<Pool> pool() const { return pool_; }
  // Which tier holds each mapped chunk, front to back.
  std::vector<Location> chunk_locations() const;

  // Move [start, end) to host chunks / back to device chunks, same address.
  // Where the pool parks host chunks, offloaded bytes are unmapped until prefetched.
  size_t offload(size_t start, size_t end);
  size_t prefetch(size_t start, size_t end);
  // Let another device use the range; re-applied whenever chunks are mapped or moved.
  void grant_access(int peer_device);

  // Pinned tensors are never chosen to be borrowed by the pool.
  void pin();
  void unpin();

  // Live torch views of [start, end): a view keeps its bytes mapped until it is freed.
  void add_view(size_t start, size_t end);
  void drop_view(size_t start, size_t end);
  size_t live_views() const;

  // Called by the pool: move up to `want` bytes of this tensor's coldest
  // device chunks to host. Returns bytes moved; 0 if busy or pinned.
  size_t borrow_from(size_t want);
  // Called by the pool: bring borrowed chunks back while the device has room.
  size_t give_back();
  double last_use() const { return last_use_; }

 private:
  void check_live() const;
  void resize_locked(size_t nbytes, bool may_deflate = true);
  void grant_peers_locked(size_t first, size_t count);
  // Throws unless no live view overlaps bytes [start, end).
  void check_no_view(size_t start, size_t end, const char* action) const;
  void touch();
  size_t move_locked(size_t first, size_t last, Location to, bool may_deflate);
  size_t move_front(size_t count, Location to);
  void release_locked();

  std::shared_ptr<Pool> pool_;
  const size_t chunk_;
  uintptr_t base_ = 0;
  size_t max_bytes_;   // reserved, a multiple of the chunk size
  Tag tag_;
  size_t nbytes_ = 0;
  std::vector<Chunk> chunks_;  // chunk i is mapped at base_ + i * chunk_
  std::vector<int> peers_;     // devices granted access to the range
  mutable OwnedMutex mu_;
  std::atomic<bool> released_{false};
  std::atomic<int> pins_{0};
  std::atomic<double> last_use_{0};
  mutable std::mutex views_mu_;
  std::multiset<std::pair<size_t, size_t>> views_;  // [start, end) of each live view
};

}  // namespace ellm
