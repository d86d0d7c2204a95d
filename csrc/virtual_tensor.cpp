#include "virtual_tensor.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "format.h"

namespace ellm {

namespace {
// 2^47 bytes: more address space than any device offers; larger is a bug.
constexpr size_t kMaxReserve = size_t(1) << 47;

double clock_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

VirtualTensor::VirtualTensor(std::shared_ptr<Pool> pool, size_t max_bytes, Tag tag)
    : pool_(std::move(pool)), chunk_(pool_->chunk_bytes()), tag_(tag) {
  if (max_bytes == 0 || max_bytes > kMaxReserve)
    throw InvalidArgument("max_bytes must be between 1 and " + format_bytes(kMaxReserve) + ", got " +
                          std::to_string(max_bytes));
  max_bytes_ = (max_bytes + chunk_ - 1) / chunk_ * chunk_;
  base_ = pool_->reserve(max_bytes_);
  pool_->attach(this);
  touch();
}

VirtualTensor::~VirtualTensor() {
  pool_->detach(this);
  if (released_) return;
  try {
    release_locked();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "torch_ellm: releasing a VirtualTensor failed: %s\n", e.what());
  }
}

void VirtualTensor::check_live() const {
  if (released_) throw UseAfterRelease("VirtualTensor used after release()");
}

void VirtualTensor::touch() { last_use_ = clock_seconds(); }

size_t VirtualTensor::nbytes() const {
  std::lock_guard<OwnedMutex> lock(mu_);
  return nbytes_;
}

size_t VirtualTensor::mapped_bytes() const {
  std::lock_guard<OwnedMutex> lock(mu_);
  return chunks_.size() * chunk_;
}

size_t VirtualTensor::host_bytes() const {
  std::lock_guard<OwnedMutex> lock(mu_);
  return chunk_ * std::count_if(chunks_.begin(), chunks_.end(),
                                [](const Chunk& c) { return c.where == Location::Host; });
}

std::vector<Location> VirtualTensor::chunk_locations() const {
  std::lock_guard<OwnedMutex> lock(mu_);
  std::vector<Location> out;
  for (const Chunk& c : chunks_) out.push_back(c.where);
  return out;
}

void VirtualTensor::resize(size_t nbytes, bool may_deflate) {
  std::lock_guard<OwnedMutex> lock(mu_);
  resize_locked(nbytes, may_deflate);
}

bool VirtualTensor::try_resize(size_t nbytes) {
  std::unique_lock<OwnedMutex> lock(mu_, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  resize_locked(nbytes);
  return true;
}

void VirtualTensor::resize_locked(size_t nbytes, bool may_deflate) {
  check_live();
  if (nbytes > max_bytes_)
    throw InvalidArgument("resize to " + std::to_string(nbytes) + " bytes is past max_bytes (" +
                          std::to_string(max_bytes_) + ")");
  size_t need = (nbytes + chunk_ - 1) / chunk_, have = chunks_.size();
  if (need > have) {
    std::vector<Chunk> fresh = pool_->acquire(need - have, Location::Device, tag_, may_deflate);
    try {
      pool_->map(base_ + have * chunk_, fresh);  // all or nothing
    } catch (...) {
      pool_->release(fresh, tag_);
      throw;
    }
    chunks_.insert(chunks_.end(), fresh.begin(), fresh.end());
    grant_peers_locked(have, fresh.size());
  } else if (need < have) {
    check_no_view(need * chunk_, SIZE_MAX, "shrink a VirtualTensor");
    std::vector<Chunk> tail(chunks_.begin() + need, chunks_.end());
    pool_->unmap(base_ + need * chunk_, tail);
    chunks_.resize(need);
    pool_->release(tail, tag_);
  }
  nbytes_ = nbytes;
  touch();
}

void VirtualTensor::release() {
  std::lock_guard<OwnedMutex> lock(mu_);
  if (released_) throw UseAfterRelease("VirtualTensor released twice");
  release_locked();
}

void VirtualTensor::release_locked() {
  {
    std::lock_guard<std::mutex> views(views_mu_);
    if (!views_.empty())
      throw InvalidArgument("cannot release a VirtualTensor while " + std::to_string(views_.size()) +
                            " tensor view(s) of it are alive; delete them first");
  }
  pool_->unmap(base_, chunks_);
  pool_->release(chunks_, tag_);
  chunks_.clear();
  pool_->free_range(base_, max_bytes_);
  nbytes_ = 0;
  released_ = true;
  pool_->detach(this);
}

size_t VirtualTensor::move_locked(size_t first, size_t last, Location to, bool may_deflate) {
  std::vector<size_t> idx;
  for (size_t i = first; i < last; ++i)
    if (chunks_[i].where != to) idx.push_back(i);
  if (idx.empty()) return 0;
  if (to == Location::Host && pool_->parks_host())  // a view of an unmapped range would fault
    check_no_view(idx.front() * chunk_, (idx.back() + 1) * chunk_, "park (offload) bytes");
  std::vector<Chunk> fresh = pool_->acquire(idx.size(), to, tag_, may_deflate);
  std::vector<Chunk> old;
  size_t done = 0;
  try {
    pool_->synchronize();
    for (; done < idx.size(); ++done) {
      size_t i = idx[done];
      pool_->migrate(base_ + i * chunk_, chunks_[i], fresh[done]);
      old.push_back(chunks_[i]);
      chunks_[i] = fresh[done];
      grant_peers_locked(i, 1);
    }
  } catch (...) {
    pool_->release(std::vector<Chunk>(fresh.begin() + done, fresh.end()), tag_);
    pool_->release(old, tag_);
    throw;
  }
  pool_->release(old, tag_);
  return done * chunk_;
}

static void check_range(size_t start, size_t end, size_t mapped) {
  if (start > end || end > mapped)
    throw InvalidArgument("byte range [" + std::to_string(start) + ", " + std::to_string(end) +
                          ") is not inside the mapped " + std::to_string(mapped) + " bytes");
}

size_t VirtualTensor::offload(size_t start, size_t end) {
  std::lock_guard<OwnedMutex> lock(mu_);
  check_live();
  check_range(start, end, chunks_.size() * chunk_);
  return move_locked(start / chunk_, (end + chunk_ - 1) / chunk_, Location::Host, false);
}

size_t VirtualTensor::prefetch(size_t start, size_t end) {
  std::lock_guard<OwnedMutex> lock(mu_);
  check_live();
  check_range(start, end, chunks_.size() * chunk_);
  touch();
  return move_locked(start / chunk_, (end + chunk_ - 1) / chunk_, Location::Device, true);
}

void VirtualTensor::grant_access(int peer_device) {
  std::lock_guard<OwnedMutex> lock(mu_);
  check_live();
  if (std::find(peers_.begin(), peers_.end(), peer_device) != peers_.end()) return;
  peers_.push_back(peer_device);
  try {
    grant_peers_locked(0, chunks_.size());
  } catch (...) {
    peers_.pop_back();
    throw;
  }
}

// A remap loses per-range access: give it again to every peer.
// Parked chunks are unmapped: grant the mapped runs between them.
void VirtualTensor::grant_peers_locked(size_t first, size_t count) {
  if (peers_.empty()) return;
  pool_->for_each_mapped_run(chunks_, first, first + count, [&](size_t i, size_t j) {
    for (int peer : peers_) pool_->grant_access(base_ + i * chunk_, (j - i) * chunk_, peer);
  });
}

void VirtualTensor::check_no_view(size_t start, size_t end, const char* action) const {
  std::lock_guard<std::mutex> views(views_mu_);
  for (auto& v : views_)
    if (v.first < v.second && v.first < end && start < v.second)  // an empty view covers nothing
      throw InvalidArgument("cannot " + std::string(action) + " at bytes [" + std::to_string(start) + ", " +
                            (end == SIZE_MAX ? std::string("end") : std::to_string(end)) +
                            "): a live tensor view covers bytes [" + std::to_string(v.first) + ", " +
                            std::to_string(v.second) + "); delete the view first");
}

void VirtualTensor::pin() {
  std::lock_guard<OwnedMutex> lock(mu_);  // waits for a move in flight
  check_live();
  pins_ += 1;
  touch();
}

void VirtualTensor::unpin() {
  if (pins_.fetch_sub(1) <= 0) {
    pins_ += 1;
    throw InvalidArgument("unpin() without a matching pin()");
  }
}

// Pool-initiated moves: never wait on a busy tensor, never move a pinned one,
// take the front first (the oldest data, a KV prefix), and never deflate.
size_t VirtualTensor::move_front(size_t count, Location to) {
  std::unique_lock<OwnedMutex> lock(mu_, std::try_to_lock);
  if (!lock.owns_lock() || released_ || pins_ > 0) return 0;
  count = std::min(count, pool_->free_chunks(to, tag_));
  size_t last = 0, picked = 0;
  while (last < chunks_.size() && picked < count)
    if (chunks_[last++].where != to) ++picked;
  if (picked == 0) return 0;
  try {
    return move_locked(0, last, to, false);
  } catch (const OutOfMemory&) {
    return 0;  // the room was taken by someone else meanwhile
  }
}

size_t VirtualTensor::borrow_from(size_t want) { return move_front((want + chunk_ - 1) / chunk_, Location::Host); }

size_t VirtualTensor::give_back() { return move_front(SIZE_MAX, Location::Device); }

void VirtualTensor::add_view(size_t start, size_t end) {
  std::lock_guard<OwnedMutex> lock(mu_);
  check_live();
  if (start > end || end > chunks_.size() * chunk_)
    throw InvalidArgument("a view of bytes [" + std::to_string(start) + ", " + std::to_string(end) +
                          ") is past the mapped " + std::to_string(chunks_.size() * chunk_) + " bytes; resize() first");
  for (size_t i = start / chunk_; i * chunk_ < end; ++i)
    if (pool_->parked(chunks_[i]))
      throw InvalidArgument("a view of bytes [" + std::to_string(start) + ", " + std::to_string(end) +
                            ") covers chunk " + std::to_string(i) + ", parked in host memory and unmapped; prefetch() it first");
  std::lock_guard<std::mutex> views(views_mu_);
  views_.insert({start, end});
  touch();
}

void VirtualTensor::drop_view(size_t start, size_t end) {
  std::lock_guard<std::mutex> views(views_mu_);
  auto it = views_.find({start, end});
  if (it != views_.end()) views_.erase(it);
}

size_t VirtualTensor::live_views() const {
  std::lock_guard<std::mutex> views(views_mu_);
  return views_.size();
}

}  // namespace ellm
