// CachingAllocator: PyTorch's alloc/free over one Pool, per device.
// Small requests (up to the smaller of 1 MiB and a quarter chunk) share slabs by size class: a
// slab is a run of pages (a 32nd of a chunk) in a chunk shared by the slabs of
// one tag, as in mimalloc, so a size class used once costs its pages, not a
// chunk. Larger requests get their own virtual range, mapped chunk by chunk
// from anywhere in the pool, so a large block needs free chunks, never
// contiguous physical memory. Freed blocks are cached per stream and reused on
// that stream without a driver call.
//
// CUDA graphs: while a graph is captured, the allocations its filter claims go
// to the graph's private pool, whose blocks only that pool reuses (its replays
// keep writing them) and which nothing unmaps until no graph uses the pool.
// While any capture is underway the allocator queries no event, synchronizes
// nothing, unmaps nothing and lets the pool deflate no one: all would
// synchronize, which is illegal during a capture.
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "pool.h"
#include "virtual_tensor.h"

namespace ellm {

// Whether an allocation on `stream` belongs to a capture (PyTorch's filter, behind a C call).
using CaptureFilter = int (*)(void* context, uintptr_t stream);

class CachingAllocator {
 public:
  explicit CachingAllocator(std::shared_ptr<Pool> pool);
  ~CachingAllocator();
  // Become the pool's first consumer: when the pool is short, the cache is
  // emptied before any KV cache shrinks or anything is borrowed.
  static void register_with_pool(const std::shared_ptr<CachingAllocator>& self);

  void* allocate(size_t size, uintptr_t stream, Tag tag);
  void free(void* ptr);
  // The block is also used on `stream`: it is reused only after that work ends.
  void record_stream(void* ptr, uintptr_t stream);
  // Let another device use the block's whole mapped range.
  void grant_access(void* ptr, int peer_device);
  // Private pools of CUDA graphs and MemPools (pool: a nonzero id), as PyTorch's own allocator
  // keeps them. From begin until end, allocations for which filter(context, stream) holds come
  // from the pool. Each begin is a use and each release gives one back; at none (no graph uses
  // it), its blocks join the shared cache after a synchronize, the live ones when freed.
  void begin_allocate_to_pool(uint64_t pool, CaptureFilter filter, void* context);
  void end_allocate_to_pool(uint64_t pool);
  void release_pool(uint64_t pool);
  bool capturing() const;
  // Unmap every cached block; chunks go back to the pool. Returns bytes freed.
  size_t empty_cache();
  size_t cached_bytes() const;
  std::map<std::string, double> stats() const;
  void reset_peak_stats();
  // Blocks handed out or waiting on events, private pools or captures: what configure must not drop.
  bool busy() const;
  bool owns(void* ptr) const;
  std::shared_ptr<Pool> pool() { return pool_; }

 private:
  struct Slab;
  struct SmallChunk {  // one mapped chunk of a tag, carved into pages for slabs
    std::shared_ptr<VirtualTensor> range;
    Tag tag;
    uint32_t pages_used = 0;  // bit i: page i belongs to a slab
    size_t slabs = 0;         // slabs carved from it
    size_t busy_slabs = 0;    // of those, the ones with a block handed out
    size_t private_slabs = 0; // of those, the ones of a graph's private pool (they keep it mapped)
  };
  struct Block {
    uintptr_t ptr;
    size_t size;       // bytes asked for
    size_t capacity;   // bytes the block occupies (slot or mapped range)
    uintptr_t stream;
    Tag tag;
    uint64_t pool;                           // 0: the shared cache; else a graph's private pool
    Slab* slab;                              // small blocks
    std::shared_ptr<VirtualTensor> range;    // large blocks
    std::vector<uintptr_t> other_streams;
    std::vector<uint64_t> events;            // pending before reuse
    uint64_t cached_at = 0;                  // cache_clock_ when last cached
  };
  struct Slab {
    SmallChunk* chunk;
    std::vector<Slab*>* open;  // its class's slabs with a free slot (this one, while it has one)
    size_t first_page, pages;
    size_t slot;
    std::vector<uintptr_t> free_slots;
    size_t used = 0;
  };
  struct SlabList {  // the slabs of one (stream, tag, size class)
    std::vector<std::unique_ptr<Slab>> all;
    std::vector<Slab*> open;  // those with a free slot: a hit costs no search
  };
  // Free lists are keyed by private pool, stream and tag: reuse stays in a
  // graph's pool and on the stream that freed a block, and pool stats by tag
  // stay exact.
  struct Key {
    uint64_t pool;
    uintptr_t stream;
    Tag tag;
    size_t size_class;
    bool operator<(const Key& o) const {
      return std::tie(pool, stream, tag, size_class) < std::tie(o.pool, o.stream, o.tag, o.size_class);
    }
  };
  struct Capture {
    uint64_t pool;
    CaptureFilter filter;
    void* context;
  };

  size_t size_class(size_t size) const;
  // The private pool an allocation on `stream` goes to now; 0 for the shared cache.
  uint64_t route(uintptr_t stream);
  bool capturing_locked() const { return !captures_.empty(); }
  // key, or its shared-cache twin if its private pool was released since it was routed.
  Key current_locked(Key key) const;
  void* allocate_small(size_t size, const Key& routed);
  void* allocate_large(size_t size, const Key& key);
  void* take_cached_large(size_t chunks, size_t size, const Key& key);
  void recycle_locked(std::unique_ptr<Block> b);
  // Events on the other streams b was used on, which must pass before it is reused.
  void record_other_streams_locked(Block& b);
  // A private pool no one uses: its cached blocks and slabs join the shared cache.
  void free_pool_locked(uint64_t pool);
  std::unique_ptr<Block> take_resizable_locked(size_t chunks, const Key& key);
  size_t cached_large_chunks_locked() const;
  // Unmap cached large blocks, least recently freed first, worth at least `chunks` chunks or all there are.
  void recycle_cached_large_locked(size_t chunks, std::vector<std::shared_ptr<VirtualTensor>>& to_release);
  void process_events_locked();
  // Drop every cached block and empty slab; chunks left without slabs go to
  // to_release. Returns the bytes that will go back to the pool; *pages_freed
  // says whether pages inside chunks that stay became free as well.
  size_t empty_cache_locked(std::vector<std::shared_ptr<VirtualTensor>>& to_release, bool* pages_freed = nullptr);
  // Free the pages of empty slabs (of `tag` only, if given); false if there were none.
  bool drop_empty_slabs_locked(const Tag* tag);
  void count_alloc_locked(const Block& b, int sign);
  void add_reserved_locked(size_t bytes);
  // Record b as live and return its pointer.
  void* hand_out_locked(std::unique_ptr<Block> b);
  void* take_slot_locked(Slab* slab, size_t size, const Key& key);
  // A new slab of class cls in a chunk of tag with `pages` free pages in a row; null if none has.
  Slab* carve_locked(const Key& key, size_t pages);
  Slab* carve_from_locked(SmallChunk& chunk, const Key& key, size_t pages);

  std::shared_ptr<Pool> pool_;
  int consumer_id_ = 0;
  const size_t chunk_;
  const size_t small_limit_;
  const size_t pages_per_chunk_, page_;
  mutable std::mutex mu_;
  std::unordered_map<uintptr_t, std::unique_ptr<Block>> live_;
  std::vector<std::unique_ptr<SmallChunk>> small_chunks_;              // small: chunks of pages
  std::map<Key, SlabList> slabs_;                                       // small: slabs by class
  std::map<Key, std::multimap<size_t, std::unique_ptr<Block>>> large_;  // large: cached blocks by chunks
  std::vector<std::unique_ptr<Block>> pending_;                         // freed, waiting on events
  std::vector<std::unique_ptr<Block>> deferred_;  // freed during a capture, used on other streams: events after it
  std::vector<Capture> captures_;                 // underway
  std::map<uint64_t, int> pool_uses_;             // private pools: begins not yet released (0: to be freed)
  std::vector<uint64_t> unused_pools_;            // released during a capture: freed once none is underway
  std::atomic<bool> routing_{false};              // captures_ is not empty: allocations ask route()
  uint64_t cache_clock_ = 0;  // orders cached large blocks by when they were freed
  size_t most_mapped_ = 0;    // the most reserved_ has been since the cache was last emptied
  // Counters with PyTorch's names (memory_stats()).
  size_t allocated_ = 0, allocated_peak_ = 0, reserved_ = 0, reserved_peak_ = 0;
  size_t allocations_ = 0, segments_ = 0;
  size_t num_alloc_retries_ = 0, num_ooms_ = 0, allocated_total_ = 0, freed_total_ = 0;
};

}  // namespace ellm
