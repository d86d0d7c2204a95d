// CudaBackend: the Backend operations on the CUDA driver's virtual memory API.
// The driver is found at run time (dlopen + cuGetProcAddress), so the library
// loads, and fails only when asked for a CUDA backend, on machines without one.
#include "backend.h"

#ifdef ELLM_WITH_CUDA_HEADERS

#include <cuda.h>
#include <dlfcn.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <type_traits>

namespace ellm {
namespace {

static_assert(sizeof(CUmemGenericAllocationHandle) == sizeof(Handle), "a chunk handle must fit a Handle");
static_assert(sizeof(CUdeviceptr) == sizeof(uintptr_t), "device addresses must fit a uintptr_t");

// Every signature is the CUDA 12.0 one, spelled out rather than taken from
// cuda.h, because that is the ABI we ask cuGetProcAddress for: a newer header
// may declare a later variant (cuCtxSynchronize_v2 takes a context, say).
struct Driver {
  CUresult (*GetErrorName)(CUresult, const char**) = nullptr;
  CUresult (*GetErrorString)(CUresult, const char**) = nullptr;
  CUresult (*Init)(unsigned int) = nullptr;
  CUresult (*DeviceGetCount)(int*) = nullptr;
  CUresult (*DeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*DeviceGetAttribute)(int*, CUdevice_attribute, CUdevice) = nullptr;
  CUresult (*DeviceGetName)(char*, int, CUdevice) = nullptr;
  CUresult (*DevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*DevicePrimaryCtxRelease)(CUdevice) = nullptr;
  CUresult (*CtxGetCurrent)(CUcontext*) = nullptr;
  CUresult (*CtxSetCurrent)(CUcontext) = nullptr;
  CUresult (*CtxSynchronize)() = nullptr;
  CUresult (*MemGetAllocationGranularity)(size_t*, const CUmemAllocationProp*,
                                          CUmemAllocationGranularity_flags) = nullptr;
  CUresult (*MemAddressReserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long) = nullptr;
  CUresult (*MemAddressFree)(CUdeviceptr, size_t) = nullptr;
  CUresult (*MemCreate)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*,
                        unsigned long long) = nullptr;
  CUresult (*MemRelease)(CUmemGenericAllocationHandle) = nullptr;
  CUresult (*MemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long) = nullptr;
  CUresult (*MemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t) = nullptr;
  CUresult (*MemUnmap)(CUdeviceptr, size_t) = nullptr;
  CUresult (*Memcpy)(CUdeviceptr, CUdeviceptr, size_t) = nullptr;
  CUresult (*MemAllocHost)(void**, size_t) = nullptr;
  CUresult (*MemFreeHost)(void*) = nullptr;
  CUresult (*DeviceTotalMem)(size_t*, CUdevice) = nullptr;
  CUresult (*EventCreate)(CUevent*, unsigned int) = nullptr;
  CUresult (*EventRecord)(CUevent, CUstream) = nullptr;
  CUresult (*EventQuery)(CUevent) = nullptr;
  CUresult (*EventDestroy)(CUevent) = nullptr;
  CUresult (*ThreadExchangeStreamCaptureMode)(CUstreamCaptureMode*) = nullptr;

  // "cuMemMap failed: CUDA_ERROR_OUT_OF_MEMORY (2): out of memory".
  void check(const char* call, CUresult result) const {
    if (result == CUDA_SUCCESS) return;
    std::string message = std::string(call) + " failed: ";
    const char* text = nullptr;
    if (GetErrorName && GetErrorName(result, &text) == CUDA_SUCCESS && text) message += std::string(text) + " ";
    message += "(" + std::to_string(static_cast<int>(result)) + ")";
    if (GetErrorString && GetErrorString(result, &text) == CUDA_SUCCESS && text) message += ": " + std::string(text);
    if (result == CUDA_ERROR_OUT_OF_MEMORY) throw PhysicalOutOfMemory(message);
    throw BackendError(message);
  }
};

using GetProcAddress = CUresult (*)(const char*, void**, int, cuuint64_t, CUdriverProcAddressQueryResult*);

GetProcAddress find_get_proc_address(void* lib) {
  // Drivers from 12.0 on export the five-argument form under this name (the unversioned
  // export keeps the old four-argument signature).
  if (auto fn = reinterpret_cast<GetProcAddress>(dlsym(lib, "cuGetProcAddress_v2"))) return fn;
  auto driver_version = reinterpret_cast<CUresult (*)(int*)>(dlsym(lib, "cuDriverGetVersion"));
  int version = 0;
  if (driver_version) Driver{}.check("cuDriverGetVersion", driver_version(&version));
  throw BackendError("torch_ellm needs a CUDA 12.0 or newer driver; libcuda.so.1 is version " +
                     std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10));
}

Driver load_driver() {
  // Never dlclose'd: the driver stays loaded for the process (PyTorch holds it too).
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) throw BackendError(std::string("cannot load the CUDA driver libcuda.so.1: ") + dlerror());
  GetProcAddress get_proc_address = find_get_proc_address(lib);

  Driver d;
  auto resolve = [&](const char* name, auto& fn) {
    void* pfn = nullptr;
    CUdriverProcAddressQueryResult status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    d.check(("cuGetProcAddress(" + std::string(name) + ")").c_str(),
            get_proc_address(name, &pfn, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &status));
    if (status != CU_GET_PROC_ADDRESS_SUCCESS || !pfn)
      throw BackendError("the CUDA driver has no " + std::string(name) + " for the CUDA 12.0 ABI (query status " +
                         std::to_string(static_cast<int>(status)) + ")");
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(pfn);
  };
  // The error-text functions first, so later failures are reported by name.
  resolve("cuGetErrorName", d.GetErrorName);
  resolve("cuGetErrorString", d.GetErrorString);
  resolve("cuInit", d.Init);
  resolve("cuDeviceGetCount", d.DeviceGetCount);
  resolve("cuDeviceGet", d.DeviceGet);
  resolve("cuDeviceGetAttribute", d.DeviceGetAttribute);
  resolve("cuDeviceGetName", d.DeviceGetName);
  resolve("cuDevicePrimaryCtxRetain", d.DevicePrimaryCtxRetain);
  resolve("cuDevicePrimaryCtxRelease", d.DevicePrimaryCtxRelease);
  resolve("cuCtxGetCurrent", d.CtxGetCurrent);
  resolve("cuCtxSetCurrent", d.CtxSetCurrent);
  resolve("cuCtxSynchronize", d.CtxSynchronize);
  resolve("cuMemGetAllocationGranularity", d.MemGetAllocationGranularity);
  resolve("cuMemAddressReserve", d.MemAddressReserve);
  resolve("cuMemAddressFree", d.MemAddressFree);
  resolve("cuMemCreate", d.MemCreate);
  resolve("cuMemRelease", d.MemRelease);
  resolve("cuMemMap", d.MemMap);
  resolve("cuMemSetAccess", d.MemSetAccess);
  resolve("cuMemUnmap", d.MemUnmap);
  resolve("cuMemcpy", d.Memcpy);
  resolve("cuMemAllocHost", d.MemAllocHost);
  resolve("cuMemFreeHost", d.MemFreeHost);
  resolve("cuDeviceTotalMem", d.DeviceTotalMem);
  resolve("cuEventCreate", d.EventCreate);
  resolve("cuEventRecord", d.EventRecord);
  resolve("cuEventQuery", d.EventQuery);
  resolve("cuEventDestroy", d.EventDestroy);
  resolve("cuThreadExchangeStreamCaptureMode", d.ThreadExchangeStreamCaptureMode);
  d.check("cuInit", d.Init(0));
  return d;
}

// Loaded once per process. A failure is remembered and reported to every
// caller: neither a missing library nor a failed cuInit gets better on retry.
const Driver& driver() {
  struct Loaded {
    Driver driver;
    std::string error;
  };
  static const Loaded loaded = [] {
    Loaded l;
    try {
      l.driver = load_driver();
    } catch (const BackendError& e) {
      l.error = e.what();
    }
    return l;
  }();
  if (!loaded.error.empty()) throw BackendError(loaded.error);
  return loaded.driver;
}

void require_multiple(const std::string& what, size_t bytes, size_t granularity) {
  if (bytes == 0 || bytes % granularity != 0)
    throw InvalidArgument(what + ": " + std::to_string(bytes) + " bytes is not a positive multiple of the " +
                          "allocation granularity, " + std::to_string(granularity) + " bytes");
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : d_(driver()), index_(device) {
    int count = 0;
    d_.check("cuDeviceGetCount", d_.DeviceGetCount(&count));
    if (device < 0 || device >= count)
      throw BackendError("CUDA device " + std::to_string(device) + " does not exist: the driver sees " +
                         std::to_string(count) + " device(s)");
    d_.check("cuDeviceGet", d_.DeviceGet(&dev_, device));
    caps_ = query_capabilities();
    if (!caps_.virtual_memory)
      throw BackendError("CUDA device " + std::to_string(device) + " (" + caps_.device_name +
                         ") does not support virtual memory management "
                         "(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED is 0)");
    const CUmemAllocationProp prop = prop_for(Location::Device);
    d_.check("cuMemGetAllocationGranularity",
             d_.MemGetAllocationGranularity(&granularity_, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    // Retained last: nothing after it throws, so a failed constructor holds nothing.
    d_.check("cuDevicePrimaryCtxRetain", d_.DevicePrimaryCtxRetain(&ctx_, dev_));
  }

  ~CudaBackend() override {
    // A destructor cannot throw, and at process exit the driver may already be
    // deinitialised; the reference is gone either way.
    (void)d_.DevicePrimaryCtxRelease(dev_);
  }

  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  int device() const override { return index_; }
  size_t granularity() const override { return granularity_; }
  Capabilities capabilities() const override { return caps_; }

  uintptr_t reserve(size_t bytes) override {
    require_multiple("reserve", bytes, granularity_);
    CUdeviceptr ptr = 0;
    relaxed([&] { d_.check("cuMemAddressReserve", d_.MemAddressReserve(&ptr, bytes, granularity_, 0, 0)); });
    return static_cast<uintptr_t>(ptr);
  }

  void free_range(uintptr_t addr, size_t bytes) override {
    releasing("cuMemAddressFree", [&] { return d_.MemAddressFree(addr, bytes); });
  }

  Handle create_chunk(size_t bytes, Location where) override {
    const CUmemAllocationProp prop = prop_for(where);
    if (where == Location::Device)
      require_multiple("device chunk", bytes, granularity_);
    else
      require_multiple(caps_.host_location + " host chunk (device granularity " + std::to_string(granularity_) +
                           " bytes)",
                       bytes, host_granularity(prop));
    CUmemGenericAllocationHandle h = 0;
    relaxed([&] { d_.check("cuMemCreate", d_.MemCreate(&h, bytes, &prop, 0)); });
    return h;
  }

  void release_chunk(Handle h, size_t /*bytes*/, Location /*where*/) override {
    releasing("cuMemRelease", [&] { return d_.MemRelease(h); });
  }

  void map(uintptr_t addr, size_t bytes, Handle h) override {
    relaxed([&] { d_.check("cuMemMap", d_.MemMap(addr, bytes, 0, h, 0)); });
  }

  // Device access is what the pool needs, whether the chunk behind the range
  // lives on the device or on the host.
  void set_access(uintptr_t addr, size_t bytes) override {
    CUmemAccessDesc access = {};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = dev_;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    relaxed([&] { d_.check("cuMemSetAccess", d_.MemSetAccess(addr, bytes, &access, 1)); });
  }

  void unmap(uintptr_t addr, size_t bytes) override {
    releasing("cuMemUnmap", [&] { return d_.MemUnmap(addr, bytes); });
  }

  // Page-locked and, with unified addressing, a valid cuMemcpy operand.
  uintptr_t alloc_parking(size_t bytes) override {
    void* p = nullptr;
    in_context([&] { d_.check("cuMemAllocHost", d_.MemAllocHost(&p, bytes)); });
    return reinterpret_cast<uintptr_t>(p);
  }

  void free_parking(uintptr_t addr, size_t /*bytes*/) override {
    releasing("cuMemFreeHost", [&] { return d_.MemFreeHost(reinterpret_cast<void*>(addr)); });
  }

  // cuMemcpy between two device-mapped addresses (host-located chunks
  // included) may return before the bytes land, hence the synchronize.
  void copy(uintptr_t dst, uintptr_t src, size_t bytes) override {
    in_context([&] {
      d_.check("cuMemcpy", d_.Memcpy(dst, src, bytes));
      d_.check("cuCtxSynchronize", d_.CtxSynchronize());
    });
  }

  // The whole context, not one stream: the driver's unmap does not wait for
  // kernels, and we cannot know which of PyTorch's streams touch a range.
  void synchronize() override {
    in_context([&] { d_.check("cuCtxSynchronize", d_.CtxSynchronize()); });
  }

  uint64_t record_event(uintptr_t stream) override {
    CUevent ev = nullptr;
    in_context([&] {
      d_.check("cuEventCreate", d_.EventCreate(&ev, CU_EVENT_DISABLE_TIMING));
      d_.check("cuEventRecord", d_.EventRecord(ev, reinterpret_cast<CUstream>(stream)));
    });
    return reinterpret_cast<uint64_t>(ev);
  }

  bool event_done(uint64_t event) override {
    CUresult r = d_.EventQuery(reinterpret_cast<CUevent>(event));
    if (r == CUDA_ERROR_NOT_READY) return false;
    d_.check("cuEventQuery", r);
    return true;
  }

  void destroy_event(uint64_t event) override {
    releasing("cuEventDestroy", [&] { return d_.EventDestroy(reinterpret_cast<CUevent>(event)); });
  }

  void grant_access(uintptr_t addr, size_t bytes, int peer_device) override {
    CUdevice peer = 0;
    d_.check("cuDeviceGet", d_.DeviceGet(&peer, peer_device));
    CUmemAccessDesc access = {};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = peer;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    in_context([&] { d_.check("cuMemSetAccess(peer)", d_.MemSetAccess(addr, bytes, &access, 1)); });
  }

 private:
  int attribute(CUdevice_attribute attr) const {
    int value = 0;
    d_.check("cuDeviceGetAttribute", d_.DeviceGetAttribute(&value, attr, dev_));
    return value;
  }

  // Host-located VMM is newer than some 12.x drivers, which reject the
  // attribute as an invalid value: for us that means "not supported".
  bool supported(CUdevice_attribute attr) const {
    int value = 0;
    CUresult result = d_.DeviceGetAttribute(&value, attr, dev_);
    if (result == CUDA_ERROR_INVALID_VALUE) return false;
    d_.check("cuDeviceGetAttribute", result);
    return value != 0;
  }

  Capabilities query_capabilities() {
    Capabilities caps;
    char name[256] = {};
    d_.check("cuDeviceGetName", d_.DeviceGetName(name, sizeof name, dev_));
    caps.device_name = name;
    caps.virtual_memory = attribute(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED) != 0;
    if (supported(CU_DEVICE_ATTRIBUTE_HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)) {
      caps.host_location = "HOST_NUMA";
      host_.type = CU_MEM_LOCATION_TYPE_HOST_NUMA;
      host_.id = std::max(0, attribute(CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID));  // -1: no NUMA, so node 0
    } else if (supported(CU_DEVICE_ATTRIBUTE_HOST_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)) {
      caps.host_location = "HOST";
      host_.type = CU_MEM_LOCATION_TYPE_HOST;
    }
    caps.host_chunks = !caps.host_location.empty();
    d_.check("cuDeviceTotalMem", d_.DeviceTotalMem(&caps.total_memory, dev_));
    return caps;
  }

  CUmemAllocationProp prop_for(Location where) const {
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    if (where == Location::Device) {
      prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
      prop.location.id = dev_;
    } else if (caps_.host_chunks) {
      prop.location = host_;
    } else {
      throw BackendError("host-located chunks not supported by this device/driver: " + caps_.device_name +
                         " reports neither HOST_NUMA (attribute 141) nor HOST (attribute 145) virtual memory support");
    }
    return prop;
  }

  size_t host_granularity(const CUmemAllocationProp& prop) {
    std::lock_guard<std::mutex> lock(host_granularity_mutex_);
    if (host_granularity_ == 0)
      d_.check("cuMemGetAllocationGranularity",
               d_.MemGetAllocationGranularity(&host_granularity_, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    return host_granularity_;
  }

  // A release call (returns a CUresult). At process exit the driver may have shut
  // down before our statics go: it frees everything then, so that counts as done.
  template <class F>
  void releasing(const char* call, F&& f) const {
    CUcontext current = nullptr;
    CUresult r = d_.CtxGetCurrent(&current);
    if (r == CUDA_ERROR_DEINITIALIZED) return;
    d_.check("cuCtxGetCurrent", r);
    relaxed([&] {
      CUresult result = f();
      if (result != CUDA_ERROR_DEINITIALIZED) d_.check(call, result);
    });
  }

  // Memory management calls, in relaxed capture mode: a CUDA graph captured meanwhile (by this
  // thread or, in global mode, any other) would otherwise refuse them, and the allocator maps new
  // memory for a graph's private pool during its capture (and frees an address range it failed to
  // map), as PyTorch's own allocator does with cudaMalloc. None is stream work: nothing is captured.
  template <typename F>
  void relaxed(F&& f) const {
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    d_.check("cuThreadExchangeStreamCaptureMode", d_.ThreadExchangeStreamCaptureMode(&mode));
    try {
      in_context(f);
    } catch (...) {
      (void)d_.ThreadExchangeStreamCaptureMode(&mode);  // best effort: f's error is the one to report
      throw;
    }
    d_.check("cuThreadExchangeStreamCaptureMode", d_.ThreadExchangeStreamCaptureMode(&mode));
  }

  // Runs f with our primary context current on this thread. A thread that had
  // none keeps ours afterwards, as after any PyTorch CUDA call; a thread bound
  // to another device's context gets it back, so we never sync the wrong device.
  template <typename F>
  void in_context(F&& f) const {
    CUcontext previous = nullptr;
    d_.check("cuCtxGetCurrent", d_.CtxGetCurrent(&previous));
    if (previous == ctx_) return f();
    d_.check("cuCtxSetCurrent", d_.CtxSetCurrent(ctx_));
    if (previous == nullptr) return f();
    try {
      f();
    } catch (...) {
      (void)d_.CtxSetCurrent(previous);  // best effort: f's error is the one to report
      throw;
    }
    d_.check("cuCtxSetCurrent", d_.CtxSetCurrent(previous));
  }

  const Driver d_;  // a copy: backends may outlive the function-local static at exit
  const int index_;
  CUdevice dev_ = 0;
  CUcontext ctx_ = nullptr;
  Capabilities caps_;
  CUmemLocation host_ = {};  // where host chunks go, when caps_.host_chunks
  size_t granularity_ = 0;
  std::mutex host_granularity_mutex_;
  size_t host_granularity_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

}  // namespace ellm

#else  // !ELLM_WITH_CUDA_HEADERS

namespace ellm {

std::unique_ptr<Backend> make_cuda_backend(int /*device*/) {
  throw BackendError(
      "torch_ellm was built without cuda.h; set CUDA_HOME (or TORCH_ELLM_CUDA_INCLUDE) to a CUDA toolkit and rebuild");
}

}  // namespace ellm

#endif  // ELLM_WITH_CUDA_HEADERS
