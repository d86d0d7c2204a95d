#include "pool.h"

#include <algorithm>
#include <cstdio>
#include <exception>

#include "format.h"
#include "virtual_tensor.h"

namespace ellm {

namespace {
const char* kTagNames[kNumTags] = {"weights", "activations", "kv", "other"};
thread_local int deflating = 0;  // no nested deflation from consumer callbacks
}  // namespace

const char* tag_name(Tag t) { return kTagNames[static_cast<int>(t)]; }

Tag parse_tag(const std::string& name) {
  for (int i = 0; i < kNumTags; ++i)
    if (name == kTagNames[i]) return static_cast<Tag>(i);
  throw InvalidArgument("unknown tag '" + name + "': expected weights, activations, kv or other");
}

const char* location_name(Location l) { return l == Location::Device ? "device" : "host"; }

Pool::Pool(std::unique_ptr<Backend> backend, size_t chunk_bytes, size_t budget_bytes, size_t host_budget_bytes,
           bool park_host)
    : backend_(std::move(backend)),
      chunk_bytes_(chunk_bytes),
      budget_(budget_bytes),
      host_budget_(host_budget_bytes),
      parks_host_(park_host || !backend_->capabilities().host_chunks),
      start_(std::chrono::steady_clock::now()) {
  size_t g = backend_->granularity();
  if (chunk_bytes == 0 || chunk_bytes % g != 0)
    throw InvalidArgument("chunk_bytes must be a positive multiple of the backend granularity (" +
                          format_bytes(g) + "), got " + std::to_string(chunk_bytes));
  staging_ = backend_->reserve(chunk_bytes_);
}

Pool::~Pool() {
  try {
    for (auto l : {Location::Device, Location::Host}) {
      Tier& t = tier(l);
      for (Handle h : t.cached) drop_chunk(h, l);
      if (t.live)
        std::fprintf(stderr, "torch_ellm: pool destroyed with %zu %s chunks still live\n", t.live, location_name(l));
    }
    for (auto& b : cached_buffers_) backend_->free_parking(b.second, b.first);
    backend_->free_range(staging_, chunk_bytes_);
  } catch (const std::exception& e) {  // a destructor must not throw
    std::fprintf(stderr, "torch_ellm: releasing a pool failed: %s\n", e.what());
  }
}

Handle Pool::new_chunk(Location where) {
  if (where == Location::Host && parks_host_) return backend_->alloc_parking(chunk_bytes_);
  return backend_->create_chunk(chunk_bytes_, where);
}

void Pool::drop_chunk(Handle h, Location where) {
  if (where == Location::Host && parks_host_) return backend_->free_parking(h, chunk_bytes_);
  backend_->release_chunk(h, chunk_bytes_, where);
}

double Pool::now() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

size_t Pool::limit_locked(Location where, Tag tag) const {
  if (where == Location::Host) return host_budget_ / chunk_bytes_;
  size_t limit = std::min(budget_, lowering_to_) / chunk_bytes_;
  // Headroom for an imminent prefill is kept from everything but activations.
  if (tag == Tag::Activations) return limit;
  size_t keep = (policy_.keep_free_bytes + chunk_bytes_ - 1) / chunk_bytes_;
  return limit > keep ? limit - keep : 0;
}

void Pool::log_locked(const char* kind, size_t bytes, double seconds) {
  Event e{now(), kind, bytes, seconds, tier(Location::Device).live * chunk_bytes_,
          tier(Location::Host).live * chunk_bytes_, {}};
  for (int i = 0; i < kNumTags; ++i)
    e.tag_bytes[i] = (tiers_[0].by_tag[i] + tiers_[1].by_tag[i]) * chunk_bytes_;
  events_.push_back(std::move(e));
  while (events_.size() > event_capacity_) events_.pop_front();
}

bool Pool::take_locked(size_t n, Location where, Tag tag, std::vector<Chunk>& out) {
  Tier& t = tier(where);
  size_t limit = limit_locked(where, tag);
  // Physical chunks end up at max(live + cached, live + n): within budget
  // whenever live + n is, since the cache never holds more than the budget.
  if (t.live + n > limit) return false;
  size_t reusable = std::min(n, t.cached.size());
  out.reserve(n);
  for (size_t i = 0; i < reusable; ++i) {
    out.push_back({t.cached.back(), where});
    t.cached.pop_back();
  }
  auto keep_for_later = [&] {  // what a failed take made or took waits in the cache
    for (auto& c : out) t.cached.push_back(c.handle);
    out.clear();
    t.physical_peak = std::max(t.physical_peak, t.physical());
  };
  try {
    while (out.size() < n) out.push_back({new_chunk(where), where});
  } catch (const PhysicalOutOfMemory&) {
    // The device is fuller than our budget thinks (another process, say):
    // keep what we made for later and report a shortfall like any other.
    keep_for_later();
    return false;
  } catch (...) {
    keep_for_later();
    throw;
  }
  t.live += n;
  t.by_tag[static_cast<int>(tag)] += n;
  t.peak = std::max(t.peak, t.borrowed());
  t.physical_peak = std::max(t.physical_peak, t.physical());
  if (where == Location::Host) release_excess_locked();  // cached host buffers count too
  return true;
}

size_t Pool::free_chunks(Location where, Tag tag) const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t limit = limit_locked(where, tag), live = tier(where).live;
  return limit > live ? limit - live : 0;
}

std::vector<Chunk> Pool::acquire(size_t n, Location where, Tag tag, bool may_deflate) {
  std::vector<Chunk> out;
  if (n == 0) return out;
  auto t0 = now();
  bool deflated = false;
  for (int attempt = 0;; ++attempt) {
    size_t short_chunks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (take_locked(n, where, tag, out)) {
        log_locked("alloc", n * chunk_bytes_, now() - t0);
        return out;
      }
      size_t limit = limit_locked(where, tag), live = tier(where).live;
      // More than the whole budget: no deflation can help, so disturb no one.
      if (n > limit) break;
      short_chunks = live + n > limit ? live + n - limit : n;
    }
    // Short of memory: free what others can spare, then try again. Never
    // from inside a consumer's own shrink (it would ask itself).
    if (where != Location::Device || !may_deflate || deflating || attempt >= 3) break;
    deflated = true;
    if (deflate(short_chunks * chunk_bytes_) == 0 && attempt > 0) break;
  }
  // Borrowing for this request did not make room enough: bring borrowed chunks home while there is
  // room (any, not only these), rather than leave others' chunks in host memory for nothing.
  if (deflated) return_borrowed();
  std::lock_guard<std::mutex> lock(mu_);
  // Internal moves (may_deflate false) probe for room: their refusals are not OOMs.
  throw oom_locked(n, where, tag, t0, may_deflate);
}

OutOfMemory Pool::oom_locked(size_t n, Location where, Tag tag, double t0, bool count) {
  if (count) {
    counters_["num_ooms"] += 1;
    log_locked("oom", n * chunk_bytes_, now() - t0);
  }
  const Tier& d = tier(Location::Device);
  const Tier& h = tier(Location::Host);
  std::string by_tag;
  for (int i = 0; i < kNumTags; ++i)
    if (d.by_tag[i] + h.by_tag[i])
      by_tag += std::string(by_tag.empty() ? "" : ", ") + kTagNames[i] + " " +
                format_bytes((d.by_tag[i] + h.by_tag[i]) * chunk_bytes_);
  return OutOfMemory(
      "torch_ellm: out of memory on the " + backend_->name() + " pool (device " + std::to_string(backend_->device()) +
      "): tried to allocate " + format_bytes(n * chunk_bytes_) + " of " + location_name(where) + " memory for " +
      tag_name(tag) + ". Device budget " + format_bytes(budget_) + ", " + format_bytes(d.live * chunk_bytes_) +
      " in use" + (by_tag.empty() ? "" : " (" + by_tag + ")") + ", " + format_bytes(d.cached.size() * chunk_bytes_) +
      " cached free, " + format_bytes(policy_.keep_free_bytes) + " kept for activations. Host budget " +
      format_bytes(host_budget_) + ", " + format_bytes(h.borrowed() * chunk_bytes_) + " borrowed, " +
      format_bytes(h.buffers * chunk_bytes_) + " in host buffers. Free tensors, raise the budget, or allow "
      "borrowing for more tags.");
}

void Pool::count_host_buffer_locked(size_t n, Tag tag, bool add) {
  Tier& h = tier(Location::Host);
  size_t& by_tag = h.by_tag[static_cast<int>(tag)];
  if (add) {
    h.live += n, h.buffers += n, by_tag += n;
  } else {
    h.live -= n, h.buffers -= n, by_tag -= n;
  }
}

uintptr_t Pool::alloc_host_buffer(size_t& bytes, Tag tag, bool optional) {
  size_t n = bytes / chunk_bytes_;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // A cached buffer up to half as large again is taken as it is: page-locking is slow (cuMemAllocHost).
    auto hit = cached_buffers_.lower_bound(bytes);
    if (hit != cached_buffers_.end() && hit->first <= bytes + bytes / 2 &&
        tier(Location::Host).live + hit->first / chunk_bytes_ <= limit_locked(Location::Host, tag)) {
      bytes = hit->first;
      uintptr_t addr = hit->second;
      cached_buffers_.erase(hit);
      cached_buffer_chunks_ -= bytes / chunk_bytes_;
      count_host_buffer_locked(bytes / chunk_bytes_, tag, true);
      log_locked("alloc", bytes, 0);
      return addr;
    }
    if (tier(Location::Host).live + n > limit_locked(Location::Host, tag))
      throw oom_locked(n, Location::Host, tag, now(), !optional);
    count_host_buffer_locked(n, tag, true);
    release_excess_locked();  // the caches may now hold host memory past the budget
  }
  uintptr_t addr;
  try {
    addr = backend_->alloc_parking(bytes);
  } catch (const PhysicalOutOfMemory&) {
    // Host RAM fuller than our budget thinks: a shortfall like any other, as for chunks.
    std::lock_guard<std::mutex> lock(mu_);
    count_host_buffer_locked(n, tag, false);
    throw oom_locked(n, Location::Host, tag, now(), true);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    count_host_buffer_locked(n, tag, false);
    throw;
  }
  std::lock_guard<std::mutex> lock(mu_);
  log_locked("alloc", bytes, 0);
  return addr;
}

void Pool::free_host_buffer(uintptr_t addr, size_t bytes, Tag tag) {
  std::lock_guard<std::mutex> lock(mu_);
  count_host_buffer_locked(bytes / chunk_bytes_, tag, false);
  cached_buffers_.emplace(bytes, addr);
  cached_buffer_chunks_ += bytes / chunk_bytes_;
  release_excess_locked();
  log_locked("free", bytes, 0);
}

void Pool::drop_cached_buffer_locked(std::multimap<size_t, uintptr_t>::iterator it) {
  backend_->free_parking(it->second, it->first);
  cached_buffer_chunks_ -= it->first / chunk_bytes_;
  cached_buffers_.erase(it);
}

void Pool::release(const std::vector<Chunk>& chunks, Tag tag) {
  if (chunks.empty()) return;
  std::lock_guard<std::mutex> lock(mu_);
  for (const Chunk& c : chunks) {
    Tier& t = tier(c.where);
    t.live -= 1;
    t.by_tag[static_cast<int>(tag)] -= 1;
    t.cached.push_back(c.handle);
  }
  release_excess_locked();
  log_locked("free", chunks.size() * chunk_bytes_, 0);
}

void Pool::release_excess_locked() {
  for (auto l : {Location::Device, Location::Host}) {
    Tier& t = tier(l);
    size_t limit = limit_locked(l, Tag::Activations);
    auto physical = [&] { return t.physical() + (l == Location::Host ? cached_buffer_chunks_ : 0); };
    while (!t.cached.empty() && physical() > limit) {
      drop_chunk(t.cached.back(), l);
      t.cached.pop_back();
    }
    while (l == Location::Host && !cached_buffers_.empty() && physical() > limit)
      drop_cached_buffer_locked(std::prev(cached_buffers_.end()));  // the largest first
  }
}

uintptr_t Pool::reserve(size_t bytes) {
  uintptr_t addr = backend_->reserve(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  reserved_bytes_ += bytes;
  return addr;
}

void Pool::free_range(uintptr_t addr, size_t bytes) {
  backend_->free_range(addr, bytes);
  std::lock_guard<std::mutex> lock(mu_);
  reserved_bytes_ -= bytes;
}

void Pool::map_accessible(uintptr_t addr, const Chunk* chunks, size_t n) {
  size_t mapped = 0;
  try {
    for (; mapped < n; ++mapped) backend_->map(addr + mapped * chunk_bytes_, chunk_bytes_, chunks[mapped].handle);
    if (n > 0) backend_->set_access(addr, n * chunk_bytes_);
  } catch (...) {
    if (mapped > 0) unmap_or_stop(addr, mapped * chunk_bytes_, "a failed map");
    throw;
  }
}

void Pool::map(uintptr_t addr, const std::vector<Chunk>& chunks) {
  map_accessible(addr, chunks.data(), chunks.size());
  std::lock_guard<std::mutex> lock(mu_);
  for (const Chunk& c : chunks) tier(c.where).mapped += 1;
}

void Pool::unmap_or_stop(uintptr_t addr, size_t bytes, const char* what) {
  try {
    backend_->unmap(addr, bytes);
  } catch (const std::exception& e) {
    // The chunks would go back to the cache still mapped here and could be handed out twice: stop.
    std::fprintf(stderr, "torch_ellm: fatal: %s could not be unmapped: %s\n", what, e.what());
    std::terminate();
  }
}

void Pool::unmap(uintptr_t addr, const std::vector<Chunk>& chunks, bool wait) {
  if (chunks.empty()) return;
  // The driver's unmap does not wait for kernels that may still touch the range.
  if (wait) backend_->synchronize();
  // Parked chunks have nothing mapped: unmap the runs between them, counting each as it goes.
  for_each_mapped_run(chunks, 0, chunks.size(), [&](size_t i, size_t j) {
    backend_->unmap(addr + i * chunk_bytes_, (j - i) * chunk_bytes_);
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t k = i; k < j; ++k) tier(chunks[k].where).mapped -= 1;
  });
}

void Pool::migrate(uintptr_t addr, const Chunk& from, const Chunk& to) {
  if (parked(to)) {
    backend_->copy(to.handle, addr, chunk_bytes_);
    backend_->unmap(addr, chunk_bytes_);
    std::lock_guard<std::mutex> lock(mu_);
    tier(from.where).mapped -= 1;
    return;
  }
  if (parked(from)) {
    map_accessible(addr, &to, 1);
    try {
      backend_->copy(addr, from.handle, chunk_bytes_);
    } catch (...) {
      unmap_or_stop(addr, chunk_bytes_, "a failed prefetch copy");
      throw;
    }
    std::lock_guard<std::mutex> lock(mu_);
    tier(to.where).mapped += 1;
    return;
  }
  {
    std::lock_guard<std::mutex> lock(staging_mu_);
    map_accessible(staging_, &to, 1);
    try {
      backend_->copy(staging_, addr, chunk_bytes_);
    } catch (...) {
      backend_->unmap(staging_, chunk_bytes_);  // the staging range must stay free for the next move
      throw;
    }
    backend_->unmap(staging_, chunk_bytes_);
  }
  try {
    backend_->remap(addr, chunk_bytes_, to.handle);
  } catch (...) {
    // Put the old chunk back (best effort) so the address keeps the bytes it had.
    try {
      backend_->unmap(addr, chunk_bytes_);
    } catch (...) {
    }
    try {
      map_accessible(addr, &from, 1);
    } catch (...) {
    }
    throw;
  }
  std::lock_guard<std::mutex> lock(mu_);
  tier(from.where).mapped -= 1;
  tier(to.where).mapped += 1;
}

size_t Pool::trim() {
  std::lock_guard<std::mutex> lock(mu_);
  size_t freed = 0;
  for (auto l : {Location::Device, Location::Host}) {
    Tier& t = tier(l);
    for (Handle h : t.cached) drop_chunk(h, l);
    freed += t.cached.size() * chunk_bytes_;
    t.cached.clear();
  }
  freed += cached_buffer_chunks_ * chunk_bytes_;
  while (!cached_buffers_.empty()) drop_cached_buffer_locked(cached_buffers_.begin());
  log_locked("trim", freed, 0);
  return freed;
}

size_t Pool::deflate(size_t want) {
  auto t0 = now();
  struct Deflating {  // marks this thread for the duration, exceptions included
    Deflating() { deflating += 1; }
    ~Deflating() { deflating -= 1; }
  } scope;
  std::vector<Consumer> consumers = consumers_copy();
  std::stable_sort(consumers.begin(), consumers.end(),
                   [](const Consumer& a, const Consumer& b) { return a.priority < b.priority; });
  size_t freed = 0;
  for (auto& c : consumers) {
    if (freed >= want) break;
    freed += c.shrink(want - freed);
  }
  if (freed > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    counters_["num_deflations"] += 1;
    log_locked("deflate", freed, now() - t0);
  }
  if (freed < want) freed += borrow(want - freed);
  return freed;
}

std::vector<Consumer> Pool::consumers_copy() const {
  std::lock_guard<std::mutex> lock(mu_);
  return consumers_;
}

std::vector<std::shared_ptr<VirtualTensor>> Pool::tensors_locked(bool borrowable_only) const {
  std::vector<std::shared_ptr<VirtualTensor>> out;
  for (VirtualTensor* vt : tensors_)
    if (!borrowable_only || policy_.borrow[static_cast<int>(vt->tag())])
      if (auto sp = vt->weak_from_this().lock()) out.push_back(std::move(sp));
  return out;
}

size_t Pool::borrow(size_t want) {
  auto t0 = now();
  std::vector<std::shared_ptr<VirtualTensor>> victims;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // A parked range is unmapped: only its owner knows when that is safe
    // (offload), and it must prefetch before use, so the pool never parks.
    if (host_budget_ < chunk_bytes_ || parks_host_) return 0;
    victims = tensors_locked(true);
  }
  // Coldest first: the tensor touched longest ago gives its memory.
  std::sort(victims.begin(), victims.end(),
            [](const auto& a, const auto& b) { return a->last_use() < b->last_use(); });
  size_t moved = 0;
  for (auto& vt : victims) {
    if (moved >= want) break;
    moved += vt->borrow_from(want - moved);
  }
  if (moved > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    counters_["num_borrows"] += 1;
    counters_["borrowed_bytes_total"] += static_cast<double>(moved);
    log_locked("borrow", moved, now() - t0);
  }
  return moved;
}

size_t Pool::return_borrowed() {
  auto t0 = now();
  std::vector<std::shared_ptr<VirtualTensor>> owners;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (tier(Location::Host).live == 0) return 0;
    owners = tensors_locked(false);
  }
  // Hottest first: the tensor used most recently wants its memory back most.
  std::sort(owners.begin(), owners.end(),
            [](const auto& a, const auto& b) { return a->last_use() > b->last_use(); });
  size_t moved = 0;
  for (auto& vt : owners) moved += vt->give_back();
  if (moved > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    counters_["num_returns"] += 1;
    log_locked("return", moved, now() - t0);
  }
  return moved;
}

void Pool::set_budget(size_t bytes) {
  std::lock_guard<std::mutex> one_at_a_time(budget_mu_);
  auto t0 = now();
  size_t excess;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // New allocations see the lower limit at once, while the budget users read
    // stays the old one until the live set really fits under the new.
    lowering_to_ = bytes;
    size_t live = tier(Location::Device).live * chunk_bytes_;
    excess = live > bytes ? live - bytes : 0;
  }
  if (excess > 0) {
    try {
      deflate(excess);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      lowering_to_ = SIZE_MAX;
      throw;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  lowering_to_ = SIZE_MAX;
  size_t live = tier(Location::Device).live * chunk_bytes_;
  if (live > bytes) {
    counters_["num_ooms"] += 1;
    log_locked("oom", live - bytes, now() - t0);
    throw OutOfMemory("torch_ellm: cannot lower the device budget to " + format_bytes(bytes) + ": " +
                      format_bytes(live) + " is still in use after deflating and borrowing (host budget " +
                      format_bytes(host_budget_) + ", " + format_bytes(tier(Location::Host).live * chunk_bytes_) +
                      " borrowed or in host buffers). Budget left at " + format_bytes(budget_) + ".");
  }
  budget_ = bytes;
  release_excess_locked();
  log_locked("budget", bytes, now() - t0);
}

void Pool::set_host_budget(size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t live = tier(Location::Host).live * chunk_bytes_;
  if (live > bytes)
    throw OutOfMemory("torch_ellm: cannot lower the host budget to " + format_bytes(bytes) + ": " +
                      format_bytes(live) + " is borrowed or in host buffers; prefetch or free it first");
  host_budget_ = bytes;
  release_excess_locked();
}

size_t Pool::budget() const {
  std::lock_guard<std::mutex> lock(mu_);
  return budget_;
}

size_t Pool::host_budget() const {
  std::lock_guard<std::mutex> lock(mu_);
  return host_budget_;
}

Policy Pool::policy() const {
  std::lock_guard<std::mutex> lock(mu_);
  return policy_;
}

void Pool::set_policy(const Policy& p) {
  std::lock_guard<std::mutex> lock(mu_);
  policy_ = p;
}

int Pool::add_consumer(std::string name, int priority, std::function<size_t(size_t)> shrink,
                       std::function<size_t()> releasable) {
  std::lock_guard<std::mutex> lock(mu_);
  int id = next_consumer_id_++;
  consumers_.push_back({id, std::move(name), priority, std::move(shrink), std::move(releasable)});
  return id;
}

void Pool::remove_consumer(int id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = std::find_if(consumers_.begin(), consumers_.end(), [id](const Consumer& c) { return c.id == id; });
  if (it == consumers_.end()) throw InvalidArgument("no consumer with id " + std::to_string(id));
  consumers_.erase(it);
}

void Pool::attach(VirtualTensor* vt) {
  std::lock_guard<std::mutex> lock(mu_);
  tensors_.push_back(vt);
}

void Pool::detach(VirtualTensor* vt) {
  std::lock_guard<std::mutex> lock(mu_);
  tensors_.erase(std::remove(tensors_.begin(), tensors_.end(), vt), tensors_.end());
}

std::map<std::string, double> Pool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  const Tier& d = tier(Location::Device);
  const Tier& h = tier(Location::Host);
  auto b = [this](size_t chunks) { return static_cast<double>(chunks * chunk_bytes_); };
  std::map<std::string, double> s = {
      {"chunk_bytes", static_cast<double>(chunk_bytes_)},
      {"budget_bytes", static_cast<double>(budget_)},
      {"host_budget_bytes", static_cast<double>(host_budget_)},
      {"reserved_address_bytes", static_cast<double>(reserved_bytes_)},
      {"device_bytes", b(d.live)},
      {"device_peak_bytes", b(d.peak)},
      {"device_cached_bytes", b(d.cached.size())},
      {"device_physical_bytes", b(d.physical())},
      {"device_physical_peak_bytes", b(d.physical_peak)},
      {"mapped_device_bytes", b(d.mapped)},
      {"borrowed_bytes", b(h.borrowed())},
      {"host_buffer_bytes", b(h.buffers)},
      {"borrowed_peak_bytes", b(h.peak)},
      {"host_cached_bytes", b(h.cached.size())},
      {"host_buffer_cached_bytes", b(cached_buffer_chunks_)},
      {"mapped_host_bytes", b(h.mapped)},
      {"virtual_tensors", static_cast<double>(tensors_.size())},
      {"parks_host", parks_host_ ? 1.0 : 0.0},
      {"num_ooms", 0}, {"num_deflations", 0}, {"num_borrows", 0}, {"num_returns", 0},
      {"borrowed_bytes_total", 0},
  };
  for (auto& kv : counters_) s[kv.first] = kv.second;
  return s;
}

size_t Pool::mapped_device_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tier(Location::Device).mapped * chunk_bytes_;
}

size_t Pool::borrowed_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tier(Location::Host).borrowed() * chunk_bytes_;
}

size_t Pool::host_buffer_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tier(Location::Host).buffers * chunk_bytes_;
}

size_t Pool::releasable_bytes() const {
  size_t total = 0;
  for (auto& c : consumers_copy())
    if (c.releasable) total += c.releasable();
  return total;
}

std::map<std::string, std::map<std::string, double>> Pool::stats_by_tag() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::map<std::string, std::map<std::string, double>> out;
  for (int i = 0; i < kNumTags; ++i)
    out[kTagNames[i]] = {{"device_bytes", static_cast<double>(tiers_[0].by_tag[i] * chunk_bytes_)},
                         {"host_bytes", static_cast<double>(tiers_[1].by_tag[i] * chunk_bytes_)}};
  return out;
}

std::vector<Event> Pool::events() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {events_.begin(), events_.end()};
}

void Pool::set_event_capacity(size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  event_capacity_ = n;
  while (events_.size() > event_capacity_) events_.pop_front();
}

}  // namespace ellm
