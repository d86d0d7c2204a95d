// The DLPack ABI (v0.8, the legacy capsule protocol PyTorch accepts): just
// the structs needed to hand a mapped range to torch without a copy.
#pragma once
#include <cstdint>

namespace ellm::dlpack {

enum DeviceType : int32_t { kCPU = 1, kCUDA = 2 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat, 6 bool
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // null: compact row-major
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

}  // namespace ellm::dlpack
