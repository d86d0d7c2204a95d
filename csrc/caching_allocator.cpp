#include "caching_allocator.h"

#include <algorithm>
#include <cstdio>
#include <limits>

#include "format.h"

namespace ellm {

namespace {
constexpr size_t kMinBlock = 512;       // PyTorch's rounding for small blocks
constexpr size_t kSmallMax = 1 << 20;   // PyTorch's small/large boundary
constexpr size_t kLargeReserve = size_t(1) << 30;  // least address space of a large block
// A miss that maps new chunks while cached large blocks hold more than this many
// times the allocated bytes unmaps the stalest of them instead (measured on
// bench/allocator.py's random trace: 2 to 4 keep most of the hits and a third
// of the reserved excess; lower costs many more misses).
constexpr size_t kMaxCacheRatio = 4;
// A cached large block up to this many chunks larger than a request is handed
// out whole: shrinking it would unmap chunks that a request of its own size
// soon maps again (Hugging Face generate's logits between KV concatenations:
// 3 chunks each way a decode step). Measured on that run's recorded trace:
// peak reserved/allocated 1.0028 -> 1.0047; the random trace's 1.14 -> 1.18.
constexpr size_t kSlackChunks = 4;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Up to 32 pages a chunk, each a multiple of the smallest block.
size_t pages_per_chunk(size_t chunk) {
  size_t pages = std::min<size_t>(32, chunk / kMinBlock);
  while (chunk % (pages * kMinBlock) != 0) --pages;
  return pages;
}

uint32_t page_run(size_t pages) { return pages >= 32 ? ~0u : (1u << pages) - 1; }
}  // namespace

CachingAllocator::CachingAllocator(std::shared_ptr<Pool> pool)
    : pool_(std::move(pool)),
      chunk_(pool_->chunk_bytes()),
      // A chunk holds at least four slots of the largest class.
      small_limit_(std::max(kMinBlock, std::min(kSmallMax, pool_->chunk_bytes() / 4))),
      pages_per_chunk_(pages_per_chunk(chunk_)),
      page_(chunk_ / pages_per_chunk_) {}

void CachingAllocator::register_with_pool(const std::shared_ptr<CachingAllocator>& self) {
  std::weak_ptr<CachingAllocator> weak = self;
  self->consumer_id_ = self->pool_->add_consumer(
      "caching allocator", std::numeric_limits<int>::min(),
      [weak](size_t) {
        auto a = weak.lock();
        if (!a) return size_t(0);
        size_t freed = a->empty_cache();
        // Emptying the cache so that a request fits is what PyTorch counts as an alloc retry.
        std::lock_guard<std::mutex> lock(a->mu_);
        if (freed) a->num_alloc_retries_ += 1;
        return freed;
      },
      [weak] {
        auto a = weak.lock();
        return a ? a->cached_bytes() : size_t(0);
      });
}

CachingAllocator::~CachingAllocator() {
  if (consumer_id_) pool_->remove_consumer(consumer_id_);
  std::lock_guard<std::mutex> lock(mu_);
  try {
    for (auto& p : pending_)
      for (uint64_t e : p->events) pool_->backend().destroy_event(e);
  } catch (const std::exception& e) {  // a destructor must not throw
    std::fprintf(stderr, "torch_ellm: destroying the allocator's events failed: %s\n", e.what());
  }
}

// Two classes per power of two (2^k and 1.5 * 2^k): at most a third wasted.
size_t CachingAllocator::size_class(size_t size) const {
  size_t n = std::max(round_up(size, kMinBlock), kMinBlock);
  size_t p = kMinBlock;
  while (p < n) {
    if (p + p / 2 >= n) return p + p / 2;
    p *= 2;
  }
  return p;
}

void CachingAllocator::count_alloc_locked(const Block& b, int sign) {
  size_t rounded = round_up(b.size, kMinBlock);
  if (sign > 0) {
    allocated_ += rounded;
    allocated_total_ += rounded;
    allocations_ += 1;
    allocated_peak_ = std::max(allocated_peak_, allocated_);
  } else {
    allocated_ -= rounded;
    freed_total_ += rounded;
    allocations_ -= 1;
  }
}

void CachingAllocator::add_reserved_locked(size_t bytes) {
  reserved_ += bytes;
  most_mapped_ = std::max(most_mapped_, reserved_);
  reserved_peak_ = std::max(reserved_peak_, reserved_);
}

void* CachingAllocator::hand_out_locked(std::unique_ptr<Block> b) {
  uintptr_t ptr = b->ptr;
  count_alloc_locked(*b, +1);
  live_[ptr] = std::move(b);
  return reinterpret_cast<void*>(ptr);
}

void* CachingAllocator::take_slot_locked(Slab* slab, size_t size, const Key& key) {
  uintptr_t ptr = slab->free_slots.back();
  slab->free_slots.pop_back();
  if (slab->free_slots.empty()) {  // no longer open; it is usually the last one
    auto it = std::find(slab->open->rbegin(), slab->open->rend(), slab);
    slab->open->erase(std::next(it).base());
  }
  if (slab->used++ == 0) slab->chunk->busy_slabs += 1;
  return hand_out_locked(
      std::make_unique<Block>(Block{ptr, size, slab->slot, key.stream, key.tag, key.pool, slab, nullptr, {}, {}}));
}

void* CachingAllocator::allocate(size_t size, uintptr_t stream, Tag tag) {
  if (size == 0) return nullptr;
  if (size > (size_t(1) << 47)) throw InvalidArgument("allocation of " + std::to_string(size) + " bytes is absurd");
  const bool small = size <= small_limit_;
  const Key key{routing_.load(std::memory_order_acquire) ? route(stream) : 0, stream, tag, small ? size_class(size) : 0};
  for (int attempt = 0;; ++attempt) {
    try {
      return small ? allocate_small(size, key) : allocate_large(size, key);
    } catch (const OutOfMemory& e) {
      // Like PyTorch: free every cached block, then try once more (the pool
      // itself has already deflated its consumers and borrowed host memory).
      // During a capture nothing can be freed: the empty is skipped.
      std::vector<std::shared_ptr<VirtualTensor>> to_release;
      bool freed;
      {
        std::lock_guard<std::mutex> lock(mu_);
        bool pages_freed = false;
        freed = empty_cache_locked(to_release, &pages_freed) > 0 || pages_freed;
        if (attempt == 0 && freed) num_alloc_retries_ += 1;
      }
      for (auto& vt : to_release) vt->release();
      if (attempt == 0 && freed) continue;
      std::lock_guard<std::mutex> lock(mu_);
      num_ooms_ += 1;
      throw OutOfMemory(std::string(e.what()) + " The caching allocator holds " + format_bytes(allocated_) +
                        " allocated and " + format_bytes(reserved_ - allocated_) + " reserved but unallocated.");
    }
  }
}

uint64_t CachingAllocator::route(uintptr_t stream) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = captures_.rbegin(); it != captures_.rend(); ++it)
    if (it->filter(it->context, stream)) return it->pool;
  return 0;
}

CachingAllocator::Key CachingAllocator::current_locked(Key key) const {
  if (key.pool && !pool_uses_.count(key.pool)) key.pool = 0;
  return key;
}

void* CachingAllocator::allocate_small(size_t size, const Key& routed) {
  // At least four slots where they fit in a chunk, in whole pages.
  size_t pages = std::min(pages_per_chunk_, (std::max(page_, 4 * routed.size_class) + page_ - 1) / page_);
  bool capturing;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const Key key = current_locked(routed);
    capturing = capturing_locked();
    process_events_locked();
    if (auto& open = slabs_[key].open; !open.empty()) return take_slot_locked(open.back(), size, key);
    if (Slab* slab = carve_locked(key, pages)) return take_slot_locked(slab, size, key);
    // No room in our chunks. A new one if the pool has it free; else the pages
    // of our own empty slabs first, before the pool asks anyone else to shrink.
    if (pool_->free_chunks(Location::Device, key.tag) == 0 && drop_empty_slabs_locked(&key.tag))
      if (Slab* slab = carve_locked(key, pages)) return take_slot_locked(slab, size, key);
  }
  // A new chunk, made without our lock: the pool may call consumers that need the GIL. While a
  // capture is underway, none: they would unmap, borrow or copy, and synchronize.
  auto range = std::make_shared<VirtualTensor>(pool_, chunk_, routed.tag);
  range->resize(chunk_, !capturing);
  std::lock_guard<std::mutex> lock(mu_);
  const Key key = current_locked(routed);  // a slab under a released pool's key would never be freed
  add_reserved_locked(chunk_);
  segments_ += 1;
  small_chunks_.push_back(std::make_unique<SmallChunk>(SmallChunk{range, key.tag}));
  return take_slot_locked(carve_from_locked(*small_chunks_.back(), key, pages), size, key);
}

CachingAllocator::Slab* CachingAllocator::carve_locked(const Key& key, size_t pages) {
  const uint32_t full = page_run(pages_per_chunk_);
  for (auto& chunk : small_chunks_)
    if (chunk->tag == key.tag && chunk->pages_used != full)
      if (Slab* slab = carve_from_locked(*chunk, key, pages)) return slab;
  return nullptr;
}

CachingAllocator::Slab* CachingAllocator::carve_from_locked(SmallChunk& chunk, const Key& key, size_t pages) {
  for (size_t first = 0; first + pages <= pages_per_chunk_; ++first) {
    uint32_t run = page_run(pages) << first;
    if (chunk.pages_used & run) continue;
    chunk.pages_used |= run;
    chunk.slabs += 1;
    if (key.pool) chunk.private_slabs += 1;
    SlabList& list = slabs_[key];
    auto slab = std::make_unique<Slab>(Slab{&chunk, &list.open, first, pages, key.size_class, {}, 0});
    uintptr_t base = chunk.range->data_ptr() + first * page_;
    for (size_t i = pages * page_ / key.size_class; i-- > 0;) slab->free_slots.push_back(base + i * key.size_class);
    list.open.push_back(slab.get());
    list.all.push_back(std::move(slab));
    return list.open.back();
  }
  return nullptr;
}

void* CachingAllocator::take_cached_large(size_t chunks, size_t size, const Key& key) {
  auto it_list = large_.find(key);
  if (it_list == large_.end()) return nullptr;
  auto& cached = it_list->second;
  // Best fit, accepting up to an eighth more than asked (kSlackChunks for
  // small counts) so that reuse never needs an unmap on the hot path.
  auto it = cached.lower_bound(chunks);
  if (it == cached.end() || it->first > chunks + std::max<size_t>(kSlackChunks, chunks / 8)) return nullptr;
  std::unique_ptr<Block> b = std::move(it->second);
  cached.erase(it);
  b->size = size;
  return hand_out_locked(std::move(b));
}

size_t CachingAllocator::cached_large_chunks_locked() const {
  size_t cached = 0;
  for (auto& [key, blocks] : large_)
    if (!key.pool)  // a private pool's blocks are its graph's until it is released
      for (auto& [n, b] : blocks) cached += n;
  return cached;
}

void CachingAllocator::recycle_cached_large_locked(size_t chunks,
                                                   std::vector<std::shared_ptr<VirtualTensor>>& to_release) {
  size_t freed = 0;
  while (freed < chunks) {
    std::multimap<size_t, std::unique_ptr<Block>>* from = nullptr;
    std::multimap<size_t, std::unique_ptr<Block>>::iterator pick;
    for (auto& [key, blocks] : large_)
      for (auto it = blocks.begin(); !key.pool && it != blocks.end(); ++it)
        if (!from || it->second->cached_at < pick->second->cached_at) {
          from = &blocks;
          pick = it;
        }
    if (!from) break;
    freed += pick->first;
    to_release.push_back(pick->second->range);
    from->erase(pick);
    segments_ -= 1;
  }
  reserved_ -= freed * chunk_;
}

std::unique_ptr<CachingAllocator::Block> CachingAllocator::take_resizable_locked(size_t chunks, const Key& key) {
  auto it_list = large_.find(key);
  if (it_list == large_.end()) return nullptr;
  auto& cached = it_list->second;
  auto best = cached.end();
  auto distance = [chunks](size_t n) { return n > chunks ? n - chunks : chunks - n; };
  for (auto it = cached.begin(); it != cached.end(); ++it)
    if (it->second->range->max_bytes() >= chunks * chunk_ && (best == cached.end() || distance(it->first) < distance(best->first)))
      best = it;
  if (best == cached.end()) return nullptr;
  std::unique_ptr<Block> b = std::move(best->second);
  reserved_ -= best->first * chunk_;
  cached.erase(best);
  return b;
}

void* CachingAllocator::allocate_large(size_t size, const Key& key) {
  size_t chunks = (size + chunk_ - 1) / chunk_;
  std::unique_ptr<Block> b;
  std::vector<std::shared_ptr<VirtualTensor>> to_release;
  bool capturing;
  {
    std::lock_guard<std::mutex> lock(mu_);
    capturing = capturing_locked();
    process_events_locked();
    if (void* p = take_cached_large(chunks, size, key)) return p;
    // A miss. A cached block of this stream is resized in place (its range
    // reserves room to grow): only the difference is mapped or unmapped. Where
    // that needs new chunks while the pool is short, or would map more than
    // the allocator has had since its cache was last emptied, or the cache is
    // much larger than what is live, the stalest cached blocks give theirs back
    // first, as many as the difference or all there are (no retry, no one else
    // asked to shrink): reserved memory stays near what is live, for a
    // synchronize on such misses only. A graph's private block or a capture
    // underway gets a new range: a resize may unmap, and unmapping is neither
    // allowed while capturing nor safe under a graph that replays.
    if (!key.pool && !capturing) b = take_resizable_locked(chunks, key);
    size_t have = b ? b->capacity / chunk_ : 0;
    if (have < chunks && !capturing) {
      size_t more = (chunks - have) * chunk_, cached = cached_large_chunks_locked();
      bool pool_short = pool_->free_chunks(Location::Device, key.tag) * chunk_ < more;
      bool new_high = reserved_ + chunks * chunk_ > most_mapped_;  // b's chunks are out of reserved_ now
      if (cached > 0 && (pool_short || new_high || cached * chunk_ > kMaxCacheRatio * allocated_))
        recycle_cached_large_locked(std::min(cached, chunks - have), to_release);
    }
  }
  for (auto& vt : to_release) vt->release();
  if (b) {
    try {
      b->range->resize(chunks * chunk_);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      b->capacity = b->range->mapped_bytes();
      reserved_ += b->capacity;
      recycle_locked(std::move(b));
      throw;
    }
  } else {
    // Reserve address space well past the request, so that once cached this
    // range can serve a larger request in place, mapping only the difference
    // (as PyTorch's expandable segments grow): address space is cheap, mapped
    // memory left cached beside a new range is not.
    size_t reserve = 1;
    while (reserve < chunks) reserve *= 2;
    reserve = std::max(2 * reserve, (kLargeReserve + chunk_ - 1) / chunk_);
    auto range = std::make_shared<VirtualTensor>(pool_, reserve * chunk_, key.tag);
    range->resize(chunks * chunk_, !capturing);  // see allocate_small
    b = std::make_unique<Block>(Block{range->data_ptr(), size, 0, key.stream, key.tag, key.pool, nullptr, range, {}, {}});
    std::lock_guard<std::mutex> lock(mu_);
    segments_ += 1;
  }
  std::lock_guard<std::mutex> lock(mu_);
  b->size = size;
  b->capacity = chunks * chunk_;
  add_reserved_locked(b->capacity);
  return hand_out_locked(std::move(b));
}

void CachingAllocator::free(void* p) {
  if (!p) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(reinterpret_cast<uintptr_t>(p));
  if (it == live_.end()) throw InvalidArgument("torch_ellm: free of a pointer this allocator did not hand out");
  std::unique_ptr<Block> b = std::move(it->second);
  live_.erase(it);
  count_alloc_locked(*b, -1);
  if (b->other_streams.empty()) return recycle_locked(std::move(b));
  if (capturing_locked()) return deferred_.push_back(std::move(b));  // events once the captures end
  record_other_streams_locked(*b);
  pending_.push_back(std::move(b));
}

void CachingAllocator::record_other_streams_locked(Block& b) {
  // Used on other streams: reusable once the work queued there so far is done.
  for (uintptr_t s : b.other_streams) b.events.push_back(pool_->backend().record_event(s));
  b.other_streams.clear();
}

void CachingAllocator::record_stream(void* p, uintptr_t stream) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(reinterpret_cast<uintptr_t>(p));
  if (it == live_.end()) throw InvalidArgument("torch_ellm: record_stream on a pointer this allocator did not hand out");
  Block& b = *it->second;
  if (stream != b.stream && std::find(b.other_streams.begin(), b.other_streams.end(), stream) == b.other_streams.end())
    b.other_streams.push_back(stream);
}

void CachingAllocator::grant_access(void* p, int peer_device) {
  std::shared_ptr<VirtualTensor> range;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(reinterpret_cast<uintptr_t>(p));
    if (it == live_.end()) throw InvalidArgument("torch_ellm: grant_access on a pointer this allocator did not hand out");
    range = it->second->slab ? it->second->slab->chunk->range : it->second->range;
  }
  range->grant_access(peer_device);
}

void CachingAllocator::recycle_locked(std::unique_ptr<Block> b) {
  if (b->pool && !pool_uses_.count(b->pool)) b->pool = 0;  // its pool is gone (its slabs are shared already)
  if (Slab* slab = b->slab) {
    if (slab->free_slots.empty()) slab->open->push_back(slab);
    slab->free_slots.push_back(b->ptr);
    if (--slab->used == 0) slab->chunk->busy_slabs -= 1;
    return;
  }
  size_t chunks = b->capacity / chunk_;
  b->cached_at = ++cache_clock_;
  large_[Key{b->pool, b->stream, b->tag, 0}].emplace(chunks, std::move(b));
}

void CachingAllocator::begin_allocate_to_pool(uint64_t pool, CaptureFilter filter, void* context) {
  if (pool == 0) throw InvalidArgument("a private pool's id must not be 0, the shared cache's");
  if (!filter) throw InvalidArgument("begin_allocate_to_pool needs a filter");
  std::lock_guard<std::mutex> lock(mu_);
  if (std::any_of(captures_.begin(), captures_.end(), [pool](const Capture& c) { return c.pool == pool; }))
    throw InvalidArgument("begin_allocate_to_pool: already allocating to private pool " + std::to_string(pool));
  captures_.push_back(Capture{pool, filter, context});
  pool_uses_[pool] += 1;
  routing_.store(true, std::memory_order_release);
}

void CachingAllocator::end_allocate_to_pool(uint64_t pool) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = std::find_if(captures_.begin(), captures_.end(), [pool](const Capture& c) { return c.pool == pool; });
  if (it == captures_.end())
    throw InvalidArgument("end_allocate_to_pool(" + std::to_string(pool) + ") without a capture into that pool");
  captures_.erase(it);
  if (capturing_locked()) return;
  routing_.store(false, std::memory_order_release);
  // Blocks freed during the captures that other streams used: their events, now that recording is allowed.
  while (!deferred_.empty()) {
    record_other_streams_locked(*deferred_.back());
    pending_.push_back(std::move(deferred_.back()));
    deferred_.pop_back();
  }
  for (; !unused_pools_.empty(); unused_pools_.pop_back()) {
    auto uses = pool_uses_.find(unused_pools_.back());
    if (uses == pool_uses_.end() || uses->second > 0) continue;  // freed already, or begun again
    pool_uses_.erase(uses);
    free_pool_locked(unused_pools_.back());
  }
}

void CachingAllocator::release_pool(uint64_t pool) {
  // PyTorch calls this from destructors (~CUDAGraph, ~MemPool): it never throws for a pool it does not know.
  std::lock_guard<std::mutex> lock(mu_);
  auto uses = pool_uses_.find(pool);
  if (uses == pool_uses_.end() || uses->second == 0 || --uses->second > 0) return;
  // Freeing synchronizes: while a capture is underway the pool stays private, at no uses, until
  // the capture ends (a replay of its last graph may still be running).
  if (capturing_locked()) return unused_pools_.push_back(pool);
  pool_uses_.erase(uses);
  free_pool_locked(pool);
}

bool CachingAllocator::capturing() const {
  std::lock_guard<std::mutex> lock(mu_);
  return capturing_locked();
}

void CachingAllocator::free_pool_locked(uint64_t pool) {
  // A replay may still be writing the pool's blocks on some stream: let it finish before anyone
  // else gets them (PyTorch's allocator frees such blocks with cudaFree, which waits as well).
  pool_->synchronize();
  // Keys of pool 0 sort first, so the loops never meet what they move.
  for (auto it = large_.begin(); it != large_.end();) {
    if (it->first.pool != pool) {
      ++it;
      continue;
    }
    auto& shared = large_[Key{0, it->first.stream, it->first.tag, 0}];
    for (auto& [chunks, b] : it->second) {
      b->pool = 0;
      shared.emplace(chunks, std::move(b));
    }
    it = large_.erase(it);
  }
  for (auto it = slabs_.begin(); it != slabs_.end();) {
    if (it->first.pool != pool) {
      ++it;
      continue;
    }
    SlabList& shared = slabs_[Key{0, it->first.stream, it->first.tag, it->first.size_class}];
    for (auto& slab : it->second.all) {
      slab->open = &shared.open;
      slab->chunk->private_slabs -= 1;
      shared.all.push_back(std::move(slab));
    }
    shared.open.insert(shared.open.end(), it->second.open.begin(), it->second.open.end());
    it = slabs_.erase(it);
  }
}

void CachingAllocator::process_events_locked() {
  if (capturing_locked()) return;  // querying an event is illegal while capturing
  auto& backend = pool_->backend();
  for (size_t i = 0; i < pending_.size();) {
    auto& ev = pending_[i]->events;
    if (!std::all_of(ev.begin(), ev.end(), [&](uint64_t e) { return backend.event_done(e); })) {
      ++i;
      continue;
    }
    for (uint64_t e : ev) backend.destroy_event(e);
    ev.clear();
    recycle_locked(std::move(pending_[i]));
    pending_.erase(pending_.begin() + static_cast<long>(i));
  }
}

bool CachingAllocator::drop_empty_slabs_locked(const Tag* tag) {
  if (capturing_locked()) return false;  // it would synchronize
  auto droppable = [tag](const Slab& s) { return s.used == 0 && (!tag || s.chunk->tag == *tag); };
  bool any = false;
  for (auto& [key, list] : slabs_)
    for (auto& slab : list.all) any = any || (!key.pool && droppable(*slab));
  if (!any) return false;
  // The freed pages may go to a slab of another stream next, while work queued
  // on the old one may still use them: let that work finish. First, so that a
  // failure leaves everything as it was.
  pool_->synchronize();
  for (auto& [key, list] : slabs_) {
    if (key.pool) continue;  // a graph's: its replays write them
    list.open.erase(std::remove_if(list.open.begin(), list.open.end(), [&](Slab* s) { return droppable(*s); }),
                    list.open.end());
    auto dropped = std::stable_partition(list.all.begin(), list.all.end(), [&](const auto& s) { return !droppable(*s); });
    for (auto it = dropped; it != list.all.end(); ++it) {
      (*it)->chunk->pages_used &= ~(page_run((*it)->pages) << (*it)->first_page);
      (*it)->chunk->slabs -= 1;
    }
    list.all.erase(dropped, list.all.end());
  }
  return true;
}

size_t CachingAllocator::empty_cache_locked(std::vector<std::shared_ptr<VirtualTensor>>& to_release,
                                            bool* pages_freed) {
  if (pages_freed) *pages_freed = false;
  if (capturing_locked()) return 0;  // unmapping synchronizes, which is illegal while capturing
  process_events_locked();
  size_t freed = 0, released = to_release.size();
  bool dropped = drop_empty_slabs_locked(nullptr);
  auto busy = std::stable_partition(small_chunks_.begin(), small_chunks_.end(),
                                    [](const auto& c) { return c->slabs > 0; });
  for (auto it = busy; it != small_chunks_.end(); ++it) {
    to_release.push_back((*it)->range);
    freed += chunk_;
  }
  small_chunks_.erase(busy, small_chunks_.end());
  if (pages_freed) *pages_freed = dropped;
  for (auto& [key, cached] : large_) {
    if (key.pool) continue;  // a graph's until it is released
    for (auto& [chunks, b] : cached) {
      to_release.push_back(b->range);
      freed += chunks * chunk_;
    }
    cached.clear();
  }
  reserved_ -= freed;
  most_mapped_ = reserved_;  // the footprint was given up on purpose: it may grow again from here
  segments_ -= to_release.size() - released;
  return freed;
}

size_t CachingAllocator::cached_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (capturing_locked()) return 0;  // empty_cache() frees nothing then
  size_t bytes = 0;
  for (auto& chunk : small_chunks_)  // a block in use, or a graph's slab, keeps it mapped
    bytes += chunk->busy_slabs || chunk->private_slabs ? 0 : chunk_;
  return bytes + cached_large_chunks_locked() * chunk_;
}

size_t CachingAllocator::empty_cache() {
  std::vector<std::shared_ptr<VirtualTensor>> to_release;
  size_t freed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    freed = empty_cache_locked(to_release);
  }
  for (auto& vt : to_release) vt->release();
  return freed;
}

std::map<std::string, double> CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t requested = 0, pending = 0;
  for (auto& [ptr, b] : live_) requested += b->size;
  for (auto& b : pending_) pending += b->capacity;
  for (auto& b : deferred_) pending += b->capacity;
  size_t graph_cached = 0;  // free in private pools: kept for their graphs' replays
  for (auto& [key, blocks] : large_)
    if (key.pool)
      for (auto& [chunks, b] : blocks) graph_cached += chunks * chunk_;
  for (auto& [key, list] : slabs_)
    if (key.pool)
      for (auto& slab : list.all) graph_cached += slab->free_slots.size() * slab->slot;
  auto d = [](size_t v) { return static_cast<double>(v); };
  return {
      {"allocated_bytes.all.current", d(allocated_)},
      {"allocated_bytes.all.peak", d(allocated_peak_)},
      {"allocated_bytes.all.allocated", d(allocated_total_)},
      {"allocated_bytes.all.freed", d(freed_total_)},
      {"requested_bytes.all.current", d(requested)},
      {"active_bytes.all.current", d(allocated_ + pending)},
      {"reserved_bytes.all.current", d(reserved_)},
      {"reserved_bytes.all.peak", d(reserved_peak_)},
      {"allocation.all.current", d(allocations_)},
      {"segment.all.current", d(segments_)},
      {"num_alloc_retries", d(num_alloc_retries_)},
      {"num_ooms", d(num_ooms_)},
      {"ellm.graph_pools", d(pool_uses_.size())},
      {"ellm.graph_pool_cached_bytes", d(graph_cached)},
  };
}

bool CachingAllocator::owns(void* p) const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_.count(reinterpret_cast<uintptr_t>(p)) > 0;
}

bool CachingAllocator::busy() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !live_.empty() || !pending_.empty() || !deferred_.empty() || capturing_locked() || !pool_uses_.empty();
}

void CachingAllocator::reset_peak_stats() {
  std::lock_guard<std::mutex> lock(mu_);
  allocated_peak_ = allocated_;
  reserved_peak_ = reserved_;
}

}  // namespace ellm
