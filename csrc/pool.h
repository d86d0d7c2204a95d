// Pool: one per device. Owns the physical chunks of both tiers (device, host),
// the budgets that bound them, the free-chunk cache, per-tag counts, stats,
// the event log, and the order in which it frees memory under pressure.
#pragma once
#include <atomic>
#include <cstdint>
#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"

namespace ellm {

enum class Tag { Weights = 0, Activations = 1, KV = 2, Other = 3 };
constexpr int kNumTags = 4;
const char* tag_name(Tag t);
Tag parse_tag(const std::string& name);
const char* location_name(Location l);

struct Chunk {
  Handle handle;
  Location where;
};

// A request the budgets could not meet after the pool tried everything.
struct OutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Policy knobs a serving engine may override; see README "Elastic memory".
struct Policy {
  bool borrow[kNumTags] = {false, false, true, false};  // which tags may move to host
  size_t keep_free_bytes = 0;   // device headroom kept for an imminent prefill
};

struct Event {
  double t;            // seconds since the pool was made
  const char* kind;    // alloc, free, trim, deflate, borrow, return, budget, oom (static strings)
  size_t bytes;        // bytes the event moved
  double seconds;      // how long it took
  size_t device_bytes; // device chunks in use after the event
  size_t host_bytes;   // host chunks in use after the event
  size_t tag_bytes[kNumTags];
};

// Something that can hand memory back: asked, in priority order (lower first),
// to free up to `want` bytes; returns what it freed. Runs without pool locks.
struct Consumer {
  int id;
  std::string name;
  int priority;
  std::function<size_t(size_t)> shrink;
  std::function<size_t()> releasable;  // how much it could free now (for stats)
};

class VirtualTensor;

class Pool : public std::enable_shared_from_this<Pool> {
 public:
  // park_host: keep borrowed bytes in parking memory with their address unmapped
  // even if the backend could map host chunks (the fallback, forced; for tests).
  Pool(std::unique_ptr<Backend> backend, size_t chunk_bytes, size_t budget_bytes, size_t host_budget_bytes,
       bool park_host = false);
  ~Pool();

  Backend& backend() { return *backend_; }
  size_t chunk_bytes() const { return chunk_bytes_; }
  // Host-tier chunks are parked (copied out, address unmapped) rather than
  // mapped: the backend has no host-located chunks, or park_host was asked.
  bool parks_host() const { return parks_host_; }
  bool parked(const Chunk& c) const { return parks_host_ && c.where == Location::Host; }
  // f(i, j) for each run [i, j) of chunks[first, end) that is mapped: parked chunks split the runs.
  template <class F>
  void for_each_mapped_run(const std::vector<Chunk>& chunks, size_t first, size_t end, F&& f) const {
    for (size_t i = first; i < end;) {
      size_t j = i;
      while (j < end && !parked(chunks[j])) ++j;
      if (j > i) f(i, j);
      i = j + 1;
    }
  }

  // All or nothing: n chunks of the tier, counted under tag. On the device
  // tier a shortfall frees the cache, asks consumers, then borrows host memory.
  std::vector<Chunk> acquire(size_t n, Location where, Tag tag, bool may_deflate = true);
  // Chunks a tier can still hand out to tag without deflating.
  size_t free_chunks(Location where, Tag tag) const;
  void release(const std::vector<Chunk>& chunks, Tag tag);

  // Address ranges and mappings, counted. map() maps consecutive chunks starting at addr and sets
  // access once for all of them: the driver's access call costs per call, not per chunk.
  uintptr_t reserve(size_t bytes);
  void free_range(uintptr_t addr, size_t bytes);
  void map(uintptr_t addr, const std::vector<Chunk>& chunks);  // chunks with memory behind them: not parked
  // Unmap consecutive chunks starting at addr, after queued work has finished (wait false: chunks
  // just mapped, which no work can have touched; no synchronize, which a CUDA graph capture forbids).
  void unmap(uintptr_t addr, const std::vector<Chunk>& chunks, bool wait = true);
  void synchronize() { backend_->synchronize(); }
  void grant_access(uintptr_t addr, size_t bytes, int peer) { backend_->grant_access(addr, bytes, peer); }
  // Move the bytes at addr onto chunk `to`, remapping addr there: the address
  // keeps its contents and stays valid; `from` is left unmapped. A parked `to`
  // takes the bytes and leaves addr unmapped; a parked `from` gives them back.
  void migrate(uintptr_t addr, const Chunk& from, const Chunk& to);

  size_t trim();
  void set_budget(size_t bytes);
  void set_host_budget(size_t bytes);
  size_t budget() const;
  size_t host_budget() const;
  Policy policy() const;
  void set_policy(const Policy& p);

  int add_consumer(std::string name, int priority, std::function<size_t(size_t)> shrink,
                   std::function<size_t()> releasable);
  void remove_consumer(int id);

  // Page-locked host memory of `bytes` (a multiple of the chunk size) for a
  // HostBuffer, counted in the host tier under tag beside borrowed chunks.
  // OutOfMemory past the host budget; optional: the caller does without it
  // (swap falls back to recompute), so that refusal is not counted as an OOM.
  // A freed buffer is cached for reuse while the budget has room; a cached one
  // up to 1.5x `bytes` may be handed out, and `bytes` is then set to its size.
  uintptr_t alloc_host_buffer(size_t& bytes, Tag tag, bool optional = false);
  void free_host_buffer(uintptr_t addr, size_t bytes, Tag tag);

  // Move about want_bytes of the coldest borrowable tensors' chunks to host
  // memory (what a short pool does by itself); returns the bytes moved.
  size_t borrow(size_t want_bytes);
  // Bring borrowed chunks back to the device while there is room.
  size_t return_borrowed();

  std::map<std::string, double> stats() const;
  // Three of stats() without building it (the engine asks per scheduling decision).
  size_t mapped_device_bytes() const;
  size_t borrowed_bytes() const;
  size_t host_buffer_bytes() const;
  // What the consumers say they could give back now.
  size_t releasable_bytes() const;
  std::map<std::string, std::map<std::string, double>> stats_by_tag() const;
  std::vector<Event> events() const;
  void set_event_capacity(size_t n);

  // VirtualTensors register so the pool can pick cold ranges to borrow.
  void attach(VirtualTensor* vt);
  void detach(VirtualTensor* vt);

 private:
  struct Tier {
    size_t live = 0;               // chunks handed out
    std::vector<Handle> cached;    // created, free, kept for reuse
    size_t peak = 0;               // of live, less buffers
    size_t physical_peak = 0;      // of live + cached: what the backend held at most
    size_t mapped = 0;             // chunks mapped somewhere
    size_t by_tag[kNumTags] = {};
    size_t buffers = 0;            // of live: host buffers' chunks, not borrowed ones
    size_t physical() const { return live + cached.size(); }
    size_t borrowed() const { return live - buffers; }
  };

  bool take_locked(size_t n, Location where, Tag tag, std::vector<Chunk>& out);
  void release_excess_locked();
  size_t limit_locked(Location where, Tag tag) const;
  void log_locked(const char* kind, size_t bytes, double seconds);
  // What the pool holds, said to one asking n chunks of `where` for tag (counted as an OOM if asked).
  OutOfMemory oom_locked(size_t n, Location where, Tag tag, double t0, bool count);
  void count_host_buffer_locked(size_t n, Tag tag, bool add);
  void drop_cached_buffer_locked(std::multimap<size_t, uintptr_t>::iterator it);
  double now() const;
  size_t deflate(size_t want_bytes);
  std::vector<Consumer> consumers_copy() const;
  // Live attached tensors (those of borrowable tags only, if asked). Needs mu_.
  std::vector<std::shared_ptr<VirtualTensor>> tensors_locked(bool borrowable_only) const;
  // Backend map of n consecutive chunks + one set_access for them all, uncounted; undone on failure.
  void map_accessible(uintptr_t addr, const Chunk* chunks, size_t n);
  // Undo a mapping after a failure; if even that fails, the process stops (see the definition).
  void unmap_or_stop(uintptr_t addr, size_t bytes, const char* what);
  Handle new_chunk(Location where);
  void drop_chunk(Handle h, Location where);
  Tier& tier(Location l) { return tiers_[static_cast<int>(l)]; }
  const Tier& tier(Location l) const { return tiers_[static_cast<int>(l)]; }

  std::unique_ptr<Backend> backend_;
  const size_t chunk_bytes_;
  mutable std::mutex mu_;
  size_t budget_, host_budget_;
  size_t lowering_to_ = SIZE_MAX;  // a set_budget() in progress: the limit new allocations see
  std::mutex budget_mu_;           // one set_budget() at a time
  Tier tiers_[2];
  size_t reserved_bytes_ = 0;
  const bool parks_host_;
  // Host buffers given back, kept for reuse (size -> address): physical host memory, not live.
  std::multimap<size_t, uintptr_t> cached_buffers_;
  size_t cached_buffer_chunks_ = 0;
  Policy policy_;
  std::deque<Event> events_;
  size_t event_capacity_ = 1 << 16;
  std::map<std::string, double> counters_;
  std::vector<Consumer> consumers_;
  int next_consumer_id_ = 1;
  std::vector<VirtualTensor*> tensors_;
  std::chrono::steady_clock::time_point start_;
  // Staging address used to fill a chunk before it is remapped in place.
  std::mutex staging_mu_;
  uintptr_t staging_ = 0;
};

}  // namespace ellm
