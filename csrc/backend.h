// The few virtual-memory operations the pool needs. Two real implementations:
// HostBackend (Linux mmap + memfd) and CudaBackend (CUDA driver VMM API).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace ellm {

// Where a physical chunk lives. Device is the fast tier the budget governs;
// Host is the borrowing tier (host-located memory the device can still address).
enum class Location { Device = 0, Host = 1 };

using Handle = uint64_t;

// A failed backend call: the message names the call and the error code.
struct BackendError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The backend itself ran out of physical memory (cuMemCreate, fallocate),
// below our budget: the pool treats it like a budget shortfall.
struct PhysicalOutOfMemory : BackendError {
  using BackendError::BackendError;
};

// Bad arguments from the caller (sizes, states, names).
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A VirtualTensor (or other handle) used after it was released.
struct UseAfterRelease : std::logic_error {
  using std::logic_error::logic_error;
};

struct Capabilities {
  bool virtual_memory = false;   // reserve/map/unmap work at all
  bool host_chunks = false;      // Location::Host chunks can be mapped into a range
  std::string host_location;     // how host chunks are placed ("memfd", "HOST_NUMA", "HOST", "")
  std::string device_name;
  size_t total_memory = 0;       // physical bytes of the device (RAM for host)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual int device() const = 0;
  // Smallest chunk size and alignment for reserve/map.
  virtual size_t granularity() const = 0;
  virtual Capabilities capabilities() const = 0;

  virtual uintptr_t reserve(size_t bytes) = 0;
  virtual void free_range(uintptr_t addr, size_t bytes) = 0;

  virtual Handle create_chunk(size_t bytes, Location where) = 0;
  virtual void release_chunk(Handle h, size_t bytes, Location where) = 0;

  // map + set_access make [addr, addr+bytes) usable; unmap returns it to reserved-only.
  virtual void map(uintptr_t addr, size_t bytes, Handle h) = 0;
  virtual void set_access(uintptr_t addr, size_t bytes) = 0;
  virtual void unmap(uintptr_t addr, size_t bytes) = 0;
  // Point a mapped range at another chunk. The driver needs unmap first; the
  // host backend overrides this with an atomic MAP_FIXED replacement.
  virtual void remap(uintptr_t addr, size_t bytes, Handle h) {
    unmap(addr, bytes);
    map(addr, bytes, h);
    set_access(addr, bytes);
  }

  // Plain host memory the device can copy to and from (page-locked on cuda).
  // Where host chunks cannot be mapped into a range, a borrowed chunk's bytes
  // are parked here and its address is left unmapped until it comes back.
  virtual uintptr_t alloc_parking(size_t bytes) = 0;
  virtual void free_parking(uintptr_t addr, size_t bytes) = 0;

  // Copy between two mapped addresses (or parking memory); returns when the bytes have landed.
  virtual void copy(uintptr_t dst, uintptr_t src, size_t bytes) = 0;
  // Wait until no queued work can still touch memory we are about to unmap.
  virtual void synchronize() = 0;

  // Stream-ordered reuse: an event recorded on a stream, polled later. Work on
  // the host backend is synchronous, so its events are done at once.
  virtual uint64_t record_event(uintptr_t /*stream*/) { return 0; }
  virtual bool event_done(uint64_t /*event*/) { return true; }
  virtual void destroy_event(uint64_t /*event*/) {}

  // Let another device read and write a mapped range (per-range peer access).
  virtual void grant_access(uintptr_t /*addr*/, size_t /*bytes*/, int peer_device) {
    throw InvalidArgument(name() + " backend has no device " + std::to_string(peer_device) + " to grant access to");
  }
};

std::unique_ptr<Backend> make_host_backend(size_t granularity);
std::unique_ptr<Backend> make_cuda_backend(int device);

// "host" (granularity is its page) or "cuda" (device is the GPU index).
inline std::unique_ptr<Backend> make_backend(const std::string& name, int device, size_t granularity) {
  if (name == "host") return make_host_backend(granularity);
  if (name == "cuda") return make_cuda_backend(device);
  throw InvalidArgument("unknown backend '" + name + "': expected 'host' or 'cuda'");
}

// 2 MiB, as PyTorch's expandable segments and kvcached use, or the granularity if larger.
inline size_t default_chunk_bytes(const Backend& b) { return b.granularity() > (2u << 20) ? b.granularity() : 2u << 20; }

}  // namespace ellm
