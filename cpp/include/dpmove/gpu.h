// The CUDA driver calls the GPU copy path makes, behind one interface with two providers.
//
//   CudaGpu     - libcuda.so.1 loaded at run time with dlopen, entry points resolved by name
//                 (the module never links the driver or cudart, so `import dpmove` works on a
//                 host without one). Primary contexts, non-blocking streams, timing-disabled
//                 events.
//   EmulatedGpu - device memory that lives in host memory, streams that are FIFO worker
//                 threads, events that are per-stream sequence numbers, and a "kernel launch"
//                 that runs the batched kernel's span walk (batched_copy.h) on the stream's
//                 thread. Used when no GPU is present so the copy backends, their rings and
//                 completion threads run unchanged; its results are never GPU measurements.
//
// Conventions: calls returning int return 0 or a driver error code (CUresult; the emulated
// provider uses the same codes); kNotReady from event_query means "not yet". Handles (streams,
// events) are opaque and released through the provider that made them. Thread safety: as the
// driver (every call may come from any thread; enter() sets the calling thread's context).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace dpmove {
namespace gpu {

using DevPtr = uint64_t;  // device virtual address (CUdeviceptr)

constexpr int kNotReady = 600;     // CUDA_ERROR_NOT_READY
constexpr int kInvalidValue = 1;   // CUDA_ERROR_INVALID_VALUE
constexpr int kNotSupported = 801; // CUDA_ERROR_NOT_SUPPORTED

enum class MemType { kUnknown = 0, kHost = 1, kDevice = 2, kArray = 3, kManaged = 4 };

struct PointerInfo {
  MemType type = MemType::kUnknown;  // kUnknown: the driver does not know the address
  int device = -1;                   // ordinal of the device that owns it
  DevPtr base = 0;                   // the allocation holding the pointer
  size_t size = 0;                   // its size, bytes
  int error = 0;                     // driver error when type is kUnknown
};

class GpuApi {
 public:
  virtual ~GpuApi() = default;
  virtual const char* provider() const noexcept = 0;  // "cuda" or "emulated"
  virtual bool emulated() const noexcept = 0;
  // "" when usable; else why not (driver missing, no device, cuInit failed).
  virtual std::string load_error() const = 0;
  virtual int device_count() = 0;
  virtual std::string device_name(int dev) = 0;
  // "9.0"-style compute capability, "" for the emulated device.
  virtual std::string compute_capability(int dev) = 0;
  // Makes `dev`'s primary context current on the calling thread (retained once per device,
  // released at process exit by the driver).
  virtual int enter(int dev) = 0;

  virtual int stream_create(int dev, void** s) = 0;
  virtual void stream_destroy(int dev, void* s) = 0;
  virtual int stream_sync(void* s) = 0;  // blocks until everything queued on s has run
  virtual int event_create(int dev, void** e) = 0;
  virtual void event_destroy(int dev, void* e) = 0;
  virtual int event_record(void* e, void* s) = 0;
  virtual int event_query(void* e) = 0;  // 0, kNotReady, or an error
  virtual int event_sync(void* e) = 0;

  // Copy-engine copies; `host` must stay valid until the stream passes the copy.
  virtual int memcpy_h2d(DevPtr dst, const void* src, size_t n, void* s) = 0;
  virtual int memcpy_d2h(void* dst, DevPtr src, size_t n, void* s) = 0;

  // The batched kernel (batched_copy.h): "" when it can be launched on `dev`, else why not.
  // Loads the module on first call (fatbin from the build, else PTX from NVRTC).
  virtual std::string kernel_status(int dev) = 0;
  // Launches dpmove_batched_copy over n descriptors at `descs` (device-accessible) whose
  // longest is max_len bytes.
  virtual int launch_batched(int dev, DevPtr descs, uint32_t n, uint64_t max_len, void* s) = 0;

  // Page-locks [p, p + n) and maps it into every device's address space (PORTABLE |
  // DEVICEMAP); *alias receives the device-side address of p.
  virtual int host_register(void* p, size_t n, DevPtr* alias) = 0;
  virtual int host_unregister(void* p) = 0;
  // Pinned, mapped host memory owned by the caller (descriptor tables).
  virtual int host_alloc(size_t n, void** p, DevPtr* alias) = 0;
  virtual void host_free(void* p) = 0;

  virtual int mem_alloc(int dev, size_t n, DevPtr* p) = 0;
  virtual int mem_free(DevPtr p) = 0;
  virtual PointerInfo pointer_info(DevPtr p) = 0;
  // A dma-buf file descriptor for [p, p + n) (p and n page-aligned), owned by the caller, for
  // ibv_reg_dmabuf_mr. kNotSupported where the driver or device lacks dma-buf export.
  virtual int dmabuf_fd(DevPtr p, size_t n, int* fd) = 0;

  // "" when the device can be the target of GPUDirect RDMA (a NIC reading and writing its
  // memory), else why not.
  virtual std::string gpudirect_status(int dev) = 0;

  // "CUDA_ERROR_INVALID_VALUE: invalid argument"-style text for a code.
  virtual std::string error_string(int code) = 0;
};

// The CUDA driver provider (process-wide; loads libcuda on first use, never throws).
GpuApi& cuda_gpu();
// The emulated provider (process-wide); `devices` emulated devices (>= 1).
GpuApi& emulated_gpu();
constexpr int kEmulatedDevices = 2;

// Whether the real driver is usable and has at least one device; why not otherwise.
bool cuda_usable(std::string* why);

// Emulated device memory is host memory the emulated provider allocated; its regions record
// this so that file I/O and the buffer protocol refuse them as they would real device memory.
}  // namespace gpu
}  // namespace dpmove
