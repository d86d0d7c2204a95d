#include "host_buffer.h"

#include <cstdio>

#include "format.h"

namespace ellm {

namespace {
size_t whole_chunks(size_t nbytes, size_t chunk) {
  if (nbytes == 0) throw InvalidArgument("a host buffer needs nbytes > 0");
  if (nbytes > SIZE_MAX - chunk) throw InvalidArgument("host buffer size " + std::to_string(nbytes) + " is too large");
  return (nbytes + chunk - 1) / chunk * chunk;
}
}  // namespace

HostBuffer::HostBuffer(std::shared_ptr<Pool> pool, size_t nbytes, Tag tag, bool optional)
    : pool_(std::move(pool)), nbytes_(whole_chunks(nbytes, pool_->chunk_bytes())), tag_(tag) {
  addr_ = pool_->alloc_host_buffer(nbytes_, tag_, optional);  // may round nbytes_ up to a cached buffer
}

HostBuffer::~HostBuffer() {
  // Views hold a shared_ptr to the buffer, so none is live here.
  if (!addr_) return;
  try {
    pool_->free_host_buffer(addr_, nbytes_, tag_);
  } catch (const std::exception& e) {  // a destructor must not throw: say it and leak the memory
    std::fprintf(stderr, "torch_ellm: freeing a host buffer failed: %s\n", e.what());
  }
}

void HostBuffer::release() {
  uintptr_t addr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!addr_) return;
    if (views_) throw InvalidArgument("cannot release a host buffer while " + std::to_string(views_) +
                                      " torch view(s) of it are alive: delete them first");
    addr = addr_;
    addr_ = 0;
  }
  pool_->free_host_buffer(addr, nbytes_, tag_);
}

uintptr_t HostBuffer::data_ptr() const {
  std::lock_guard<std::mutex> lock(mu_);
  return addr_;
}

bool HostBuffer::released() const {
  std::lock_guard<std::mutex> lock(mu_);
  return addr_ == 0;
}

void HostBuffer::add_view(size_t start, size_t end) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!addr_) throw UseAfterRelease("HostBuffer used after release()");
  if (start > end || end > nbytes_)
    throw InvalidArgument("view [" + std::to_string(start) + ", " + std::to_string(end) + ") is outside the " +
                          format_bytes(nbytes_) + " host buffer");
  ++views_;
}

void HostBuffer::drop_view(size_t, size_t) {
  std::lock_guard<std::mutex> lock(mu_);
  --views_;
}

}  // namespace ellm
