"""The small part of torch_ellm that is compiled against PyTorch, once, at enable() time.

torch_ellm._C does not link PyTorch (it builds and imports anywhere). Two things need PyTorch's
C++ API, so a shim is built with torch.utils.cpp_extension (cached by PyTorch in
TORCH_EXTENSIONS_DIR; the first build takes about a minute):
- out of memory as torch.OutOfMemoryError: PyTorch turns any other exception from a pluggable
  allocator into a plain RuntimeError (PyTorch issue 133280), so the allocator calls a thrower
  here that raises c10::OutOfMemoryError;
- on CUDA, the allocator is made through PyTorch's C++ pluggable-allocator API, which, unlike the
  Python one, takes the reset (empty_cache), memory-fraction and record_stream hooks, and those that
  give CUDA graphs private pools.
"""
import ctypes
import warnings

import torch

from . import _C

_SOURCE = r"""
#include <c10/util/Exception.h>
#include <torch/library.h>
#ifdef ELLM_CUDA_HOOKS
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#endif

extern "C" void torch_ellm_throw_oom(const char* message) {
  throw c10::OutOfMemoryError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, message);
}

int64_t thrower_address() { return reinterpret_cast<int64_t>(&torch_ellm_throw_oom); }
void raise_oom(const std::string& message) { torch_ellm_throw_oom(message.c_str()); }

#ifdef ELLM_CUDA_HOOKS
#include <map>
#include <memory>
#include <mutex>

// A capture's filter (which allocations are the graph's), alive from begin to end of the capture into
// a pool, handed to torch_ellm._C as a context pointer and called through filter_call.
using Filter = std::function<bool(cudaStream_t)>;
std::mutex filters_mu;
std::map<std::pair<int, uint64_t>, std::unique_ptr<Filter>> filters;

int filter_call(void* context, uintptr_t stream) {
  return (*static_cast<Filter*>(context))(reinterpret_cast<cudaStream_t>(stream)) ? 1 : 0;
}

// PyTorch's pool ids: {uid, 0} for a graph's own pool, {0, uid} for graph_pool_handle() and MemPool();
// {0, 0} is no pool. One 64-bit id for the allocator, distinct for both kinds.
uint64_t pool_id(c10::cuda::MempoolId_t id) { return id.first ? id.first : id.second | (uint64_t(1) << 63); }
bool no_pool(c10::cuda::MempoolId_t id) { return id.first == 0 && id.second == 0; }

// The entry points of torch_ellm._C, passed in as addresses (the shim cannot link that module).
void install_allocator(int64_t alloc, int64_t free, int64_t record_stream, int64_t reset, int64_t fraction,
                       int64_t begin_pool, int64_t end_pool, int64_t release_pool, int64_t last_error) {
  auto alloc_fn = reinterpret_cast<void* (*)(ssize_t, int, void*)>(alloc);
  auto free_fn = reinterpret_cast<void (*)(void*, ssize_t, int, void*)>(free);
  auto record_fn = reinterpret_cast<int (*)(void*, void*)>(record_stream);
  auto reset_fn = reinterpret_cast<int (*)()>(reset);
  auto fraction_fn = reinterpret_cast<int (*)(double, int)>(fraction);
  auto begin_fn = reinterpret_cast<int (*)(int, uint64_t, int (*)(void*, uintptr_t), void*)>(begin_pool);
  auto end_fn = reinterpret_cast<int (*)(int, uint64_t)>(end_pool);
  auto release_fn = reinterpret_cast<int (*)(int, uint64_t)>(release_pool);
  auto error_fn = reinterpret_cast<const char* (*)()>(last_error);
  using torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator;
  auto allocator = torch::cuda::CUDAPluggableAllocator::createCustomAllocator(
      [alloc_fn](size_t size, int device, cudaStream_t stream) {
        return alloc_fn(static_cast<ssize_t>(size), device, stream);
      },
      [free_fn](void* ptr, size_t size, int device, cudaStream_t stream) {
        free_fn(ptr, static_cast<ssize_t>(size), device, stream);
      });
  auto* hooks = dynamic_cast<CUDAPluggableAllocator*>(allocator.get());
  TORCH_CHECK(hooks, "torch_ellm: PyTorch's custom allocator is not a CUDAPluggableAllocator");
  // A pointer from elsewhere (a MemPool's own) is not ours to track: ignore the code.
  hooks->set_record_stream_fn([record_fn](void* ptr, cudaStream_t stream) { (void)record_fn(ptr, stream); });
  hooks->set_reset_fn([reset_fn] { (void)reset_fn(); });
  hooks->set_memory_fraction_fn([fraction_fn](double f, int device) {
    TORCH_CHECK(fraction_fn(f, device) == 0, "torch_ellm: cannot set the memory fraction to ", f);
  });
  // CUDA graphs and MemPools get private pools, as in PyTorch's own allocator.
  hooks->set_begin_allocate_to_pool([begin_fn, error_fn](int device, c10::cuda::MempoolId_t id, Filter filter) {
    if (no_pool(id)) return;
    auto owned = std::make_unique<Filter>(std::move(filter));
    std::lock_guard<std::mutex> lock(filters_mu);
    TORCH_CHECK(begin_fn(device, pool_id(id), &filter_call, owned.get()) == 0, "torch_ellm: ", error_fn());
    filters[{device, pool_id(id)}] = std::move(owned);
  });
  hooks->set_end_allocate_to_pool_fn([end_fn, error_fn](int device, c10::cuda::MempoolId_t id) {
    if (no_pool(id)) return;
    std::lock_guard<std::mutex> lock(filters_mu);
    TORCH_CHECK(end_fn(device, pool_id(id)) == 0, "torch_ellm: ", error_fn());
    filters.erase({device, pool_id(id)});  // one capture into a pool at a time: the allocator refuses a second
  });
  hooks->set_release_pool([release_fn](int device, c10::cuda::MempoolId_t id) {
    if (!no_pool(id)) (void)release_fn(device, pool_id(id));  // from destructors: never throws
  });
  torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(allocator);
}
#endif

TORCH_LIBRARY(torch_ellm_shim, m) {
  m.def("thrower_address() -> int", &thrower_address);
  m.def("raise_oom(str message) -> ()", &raise_oom);
#ifdef ELLM_CUDA_HOOKS
  m.def("install_allocator(int alloc, int free, int record_stream, int reset, int fraction, int begin_pool, "
        "int end_pool, int release_pool, int last_error) -> ()",
        &install_allocator);
#endif
}
"""

_loaded = {}


def load(cuda=False):
    """Build (first time only) and load the shim; returns the torch.ops.torch_ellm_shim namespace."""
    if cuda not in _loaded:
        if _loaded:
            raise RuntimeError("torch_ellm: the shim is already loaded without CUDA hooks")
        from torch.utils.cpp_extension import load_inline

        load_inline(name="torch_ellm_shim_cuda" if cuda else "torch_ellm_shim", cpp_sources=_SOURCE,
                    extra_cflags=["-DELLM_CUDA_HOOKS"] if cuda else [], with_cuda=cuda, is_python_module=False)
        _loaded[cuda] = torch.ops.torch_ellm_shim
    return _loaded[cuda]


def _address(lib, name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def install_oom_error(ops):
    _C.set_oom_thrower(ops.thrower_address())


def install_cuda_allocator():
    """Register torch_ellm as PyTorch's CUDA allocator with every hook. Returns False (with a
    warning saying what is lost) where the shim cannot be built; the caller then falls back to
    the Python API, which takes alloc and free only."""
    try:
        ops = load(cuda=True)
    except Exception as e:  # no CUDA headers or compiler here: degrade, but say so
        lost = ("torch.cuda.empty_cache/record_stream/set_per_process_memory_fraction will not reach torch_ellm "
                "(use torch_ellm.empty_cache/record_stream instead), and CUDA graphs get no private pools: do not "
                "capture any")
        try:  # the CPU shim needs no CUDA headers and still makes out of memory a torch.OutOfMemoryError
            install_oom_error(load(cuda=False))
        except Exception:
            lost = "out of memory will raise RuntimeError, and " + lost
        warnings.warn(f"torch_ellm: could not build the PyTorch shim with CUDA hooks ({e}); {lost}")
        return False
    lib = ctypes.CDLL(_C.__file__)
    ops.install_allocator(*(_address(lib, n) for n in ("torch_ellm_alloc", "torch_ellm_free",
                                                         "torch_ellm_record_stream_any", "torch_ellm_empty_cache_all",
                                                         "torch_ellm_set_memory_fraction",
                                                         "torch_ellm_begin_allocate_to_pool",
                                                         "torch_ellm_end_allocate_to_pool", "torch_ellm_release_pool",
                                                         "torch_ellm_last_error")))
    install_oom_error(ops)
    return True
