// Host backend: the CUDA VMM model on Linux virtual memory.
// An address range is reserved with mmap(PROT_NONE); physical chunks are
// pages of a memfd (one file per location), committed with fallocate and
// handed back with a punched hole; mapping is mmap(MAP_FIXED|MAP_SHARED).
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "backend.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL
#endif

namespace ellm {
namespace {

[[noreturn]] void fail(const char* call, int err) {
  throw BackendError(std::string("host backend: ") + call + " failed: " + std::strerror(err) +
                     " (errno " + std::to_string(err) + ")");
}

// One memfd per location. Chunk offsets are recycled by size so the file
// stays as large as the peak, and a released chunk's pages are freed at once.
class ChunkFile {
 public:
  explicit ChunkFile(const char* name) {
    fd_ = memfd_create(name, MFD_CLOEXEC);
    if (fd_ < 0) fail("memfd_create", errno);
  }
  ~ChunkFile() { close(fd_); }
  int fd() const { return fd_; }

  uint64_t create(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t off;
    auto& spare = free_[bytes];
    if (!spare.empty()) {
      off = spare.back();
      spare.pop_back();
    } else {
      off = end_;
      if (ftruncate(fd_, static_cast<off_t>(end_ + bytes)) != 0) fail("ftruncate", errno);
      end_ += bytes;
    }
    // Commit the pages now, as cuMemCreate does, so "created" means "backed".
    if (fallocate(fd_, 0, static_cast<off_t>(off), static_cast<off_t>(bytes)) != 0) {
      int err = errno;
      spare.push_back(off);
      if (err == ENOSPC || err == ENOMEM)
        throw PhysicalOutOfMemory(std::string("host backend: fallocate: ") + std::strerror(err));
      fail("fallocate", err);
    }
    return off;
  }

  void release(uint64_t off, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                  static_cast<off_t>(bytes)) != 0)
      fail("fallocate(PUNCH_HOLE)", errno);
    free_[bytes].push_back(off);
  }

 private:
  int fd_;
  std::mutex mu_;
  uint64_t end_ = 0;
  std::map<size_t, std::vector<uint64_t>> free_;
};

class HostBackend final : public Backend {
 public:
  explicit HostBackend(size_t granularity)
      : granularity_(granularity), files_{ChunkFile("torch_ellm-device"), ChunkFile("torch_ellm-host")} {
    size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    if (granularity < page || granularity > (size_t(1) << 30) || (granularity & (granularity - 1)))
      throw InvalidArgument("host backend granularity must be a power of two between the page size (" +
                            std::to_string(page) + ") and 1 GiB, got " + std::to_string(granularity));
  }

  std::string name() const override { return "host"; }
  int device() const override { return 0; }
  size_t granularity() const override { return granularity_; }
  Capabilities capabilities() const override {
    size_t ram = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return Capabilities{true, true, "memfd", "host memory (Linux mmap + memfd)", ram};
  }

  uintptr_t reserve(size_t bytes) override {
    // Over-reserve so the range can start on a granularity boundary, then give back the slack.
    size_t span = bytes + granularity_;
    void* p = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("mmap(PROT_NONE reserve)", errno);
    uintptr_t raw = reinterpret_cast<uintptr_t>(p);
    uintptr_t start = (raw + granularity_ - 1) & ~(uintptr_t(granularity_) - 1);
    if (start > raw) munmap(p, start - raw);
    size_t tail = (raw + span) - (start + bytes);
    if (tail) munmap(reinterpret_cast<void*>(start + bytes), tail);
    return start;
  }

  void free_range(uintptr_t addr, size_t bytes) override {
    if (munmap(reinterpret_cast<void*>(addr), bytes) != 0) fail("munmap", errno);
  }

  Handle create_chunk(size_t bytes, Location where) override {
    uint64_t off = file(where).create(bytes);
    return (off << 1) | static_cast<uint64_t>(where);
  }

  void release_chunk(Handle h, size_t bytes, Location where) override {
    file(where).release(h >> 1, bytes);
  }

  void map(uintptr_t addr, size_t bytes, Handle h) override {
    // Mapped without access, like cuMemMap; set_access opens it.
    map_chunk(addr, bytes, h, PROT_NONE, 0);
  }

  // One mmap replaces the old mapping atomically, already readable and
  // writable: a thread touching the range never sees it unmapped.
  void remap(uintptr_t addr, size_t bytes, Handle h) override {
    map_chunk(addr, bytes, h, PROT_READ | PROT_WRITE, MAP_POPULATE);
  }

  void set_access(uintptr_t addr, size_t bytes) override {
    if (mprotect(reinterpret_cast<void*>(addr), bytes, PROT_READ | PROT_WRITE) != 0) fail("mprotect", errno);
  }

  void unmap(uintptr_t addr, size_t bytes) override {
    void* p = mmap(reinterpret_cast<void*>(addr), bytes, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("mmap(PROT_NONE unmap)", errno);
  }

  uintptr_t alloc_parking(size_t bytes) override {
    // Populated now, as chunks are committed at creation.
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
      if (errno == ENOMEM) throw PhysicalOutOfMemory(std::string("host backend: mmap(parking): ") + std::strerror(errno));
      fail("mmap(parking)", errno);
    }
    return reinterpret_cast<uintptr_t>(p);
  }

  void free_parking(uintptr_t addr, size_t bytes) override {
    if (munmap(reinterpret_cast<void*>(addr), bytes) != 0) fail("munmap(parking)", errno);
  }

  void copy(uintptr_t dst, uintptr_t src, size_t bytes) override {
    // Copies go into fresh mappings (a move's staging range): fault the page
    // tables in at once rather than page by page. Older kernels lack it; harmless.
    madvise(reinterpret_cast<void*>(dst), bytes, MADV_POPULATE_WRITE);
    std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
  }

  void synchronize() override {}

 private:
  ChunkFile& file(Location where) { return files_[static_cast<int>(where)]; }

  void map_chunk(uintptr_t addr, size_t bytes, Handle h, int prot, int flags) {
    auto where = static_cast<Location>(h & 1);
    void* p = mmap(reinterpret_cast<void*>(addr), bytes, prot, MAP_SHARED | MAP_FIXED | flags, file(where).fd(),
                   static_cast<off_t>(h >> 1));
    if (p == MAP_FAILED) fail("mmap(MAP_FIXED chunk)", errno);
  }

  size_t granularity_;
  ChunkFile files_[2];
};

}  // namespace

std::unique_ptr<Backend> make_host_backend(size_t granularity) {
  return std::make_unique<HostBackend>(granularity);
}

}  // namespace ellm
