// The CUDA driver provider: libcuda.so.1 through dlopen, entry points by name. The few driver
// types used are declared here (opaque handles, an int result, an unsigned long long device
// pointer), so no CUDA header is needed to build.
#include "dpmove/gpu.h"

#include <dlfcn.h>

#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "dpmove/batched_copy.h"
#include "dpmove/gpu_kernel.h"

namespace dpmove {
namespace gpu {
namespace {

using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUstream = void*;
using CUevent = void*;
using CUmodule = void*;
using CUfunction = void*;

constexpr unsigned kStreamNonBlocking = 0x1;
constexpr unsigned kEventDisableTiming = 0x2;
constexpr unsigned kHostPortable = 0x1, kHostDeviceMap = 0x2;  // cuMemHostRegister / cuMemHostAlloc
constexpr int kAttrCcMajor = 75, kAttrCcMinor = 76;
constexpr int kPtrMemoryType = 2, kPtrDeviceOrdinal = 9;
constexpr int kRangeHandleDmaBufFd = 1;
constexpr int kErrNoDevice = 100;

class CudaGpu final : public GpuApi {
 public:
  CudaGpu() {
    lib_ = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib_) {
      const char* e = dlerror();
      load_error_ = std::string("libcuda.so.1 not loadable (no NVIDIA driver here): ") + (e ? e : "?");
      return;
    }
    bool ok = true;
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib_, name));
      if (!fn) {
        ok = false;
        if (load_error_.empty()) load_error_ = std::string("libcuda.so.1 lacks ") + name;
      }
    };
    sym(init_, "cuInit");
    sym(dev_count_, "cuDeviceGetCount");
    sym(dev_get_, "cuDeviceGet");
    sym(dev_name_, "cuDeviceGetName");
    sym(dev_attr_, "cuDeviceGetAttribute");
    sym(ctx_retain_, "cuDevicePrimaryCtxRetain");
    sym(ctx_set_, "cuCtxSetCurrent");
    sym(stream_create_, "cuStreamCreate");
    sym(stream_destroy_, "cuStreamDestroy_v2");
    sym(stream_sync_, "cuStreamSynchronize");
    sym(event_create_, "cuEventCreate");
    sym(event_destroy_, "cuEventDestroy_v2");
    sym(event_record_, "cuEventRecord");
    sym(event_query_, "cuEventQuery");
    sym(event_sync_, "cuEventSynchronize");
    sym(h2d_, "cuMemcpyHtoDAsync_v2");
    sym(d2h_, "cuMemcpyDtoHAsync_v2");
    sym(host_register_, "cuMemHostRegister_v2");
    sym(host_unregister_, "cuMemHostUnregister");
    sym(host_dptr_, "cuMemHostGetDevicePointer_v2");
    sym(host_alloc_, "cuMemHostAlloc");
    sym(host_free_, "cuMemFreeHost");
    sym(mem_alloc_, "cuMemAlloc_v2");
    sym(mem_free_, "cuMemFree_v2");
    sym(ptr_attr_, "cuPointerGetAttribute");
    sym(addr_range_, "cuMemGetAddressRange_v2");
    sym(module_load_, "cuModuleLoadData");
    sym(module_fn_, "cuModuleGetFunction");
    sym(launch_, "cuLaunchKernel");
    sym(err_name_, "cuGetErrorName");
    sym(err_str_, "cuGetErrorString");
    // Optional (CUDA 11.7+): without it GPU memory is registered for RDMA through peer memory.
    dmabuf_ = reinterpret_cast<decltype(dmabuf_)>(dlsym(lib_, "cuMemGetHandleForAddressRange"));
    if (!ok) return;
    int rc = init_(0);
    if (rc != 0) {
      load_error_ = "cuInit: " + error_string(rc);
      return;
    }
    rc = dev_count_(&ndev_);
    if (rc != 0 || ndev_ == 0) {
      load_error_ = rc ? "cuDeviceGetCount: " + error_string(rc) : "the CUDA driver sees no device";
      ndev_ = 0;
      return;
    }
    ctx_.assign(static_cast<size_t>(ndev_), nullptr);
    kernel_.resize(static_cast<size_t>(ndev_));
  }

  const char* provider() const noexcept override { return "cuda"; }
  bool emulated() const noexcept override { return false; }
  std::string load_error() const override { return load_error_; }
  int device_count() override { return load_error_.empty() ? ndev_ : 0; }

  std::string device_name(int dev) override {
    char name[256] = {0};
    CUdevice d;
    if (!usable(dev) || dev_get_(&d, dev) || dev_name_(name, sizeof name - 1, d)) return "?";
    return name;
  }
  std::string compute_capability(int dev) override {
    int maj = 0, min = 0;
    CUdevice d;
    if (!usable(dev) || dev_get_(&d, dev) || dev_attr_(&maj, kAttrCcMajor, d) || dev_attr_(&min, kAttrCcMinor, d))
      return "";
    return std::to_string(maj) + "." + std::to_string(min);
  }

  int enter(int dev) override {
    if (!usable(dev)) return kInvalidValue;
    CUcontext c;
    {
      std::lock_guard<std::mutex> lk(mu_);
      c = ctx_[static_cast<size_t>(dev)];
      if (!c) {
        CUdevice d;
        int rc = dev_get_(&d, dev);
        if (rc == 0) rc = ctx_retain_(&c, d);
        if (rc) return rc;
        ctx_[static_cast<size_t>(dev)] = c;
      }
    }
    return ctx_set_(c);
  }

  int stream_create(int dev, void** s) override {
    int rc = enter(dev);
    return rc ? rc : stream_create_(s, kStreamNonBlocking);
  }
  void stream_destroy(int dev, void* s) override {
    if (enter(dev) == 0) stream_destroy_(s);
  }
  int stream_sync(void* s) override { return stream_sync_(s); }
  int event_create(int dev, void** e) override {
    int rc = enter(dev);
    return rc ? rc : event_create_(e, kEventDisableTiming);
  }
  void event_destroy(int dev, void* e) override {
    if (enter(dev) == 0) event_destroy_(e);
  }
  int event_record(void* e, void* s) override { return event_record_(e, s); }
  int event_query(void* e) override { return event_query_(e); }
  int event_sync(void* e) override { return event_sync_(e); }
  int memcpy_h2d(DevPtr dst, const void* src, size_t n, void* s) override { return h2d_(dst, src, n, s); }
  int memcpy_d2h(void* dst, DevPtr src, size_t n, void* s) override { return d2h_(dst, src, n, s); }

  std::string kernel_status(int dev) override {
    if (!usable(dev)) return "no CUDA device " + std::to_string(dev) + (load_error_.empty() ? "" : ": " + load_error_);
    std::lock_guard<std::mutex> lk(kmu_);
    Kernel& k = kernel_[static_cast<size_t>(dev)];
    if (!k.tried) load_kernel(dev, k);
    return k.fn ? "" : k.why;
  }

  int launch_batched(int dev, DevPtr descs, uint32_t n, uint64_t max_len, void* s) override {
    CUfunction fn;
    {
      std::lock_guard<std::mutex> lk(kmu_);
      Kernel& k = kernel_[static_cast<size_t>(dev)];
      if (!k.tried) load_kernel(dev, k);
      if (!k.fn) return kNotSupported;
      fn = k.fn;
    }
    unsigned chunk = kBatchedChunk;
    void* args[] = {&descs, &n, &chunk};
    return launch_(fn, n, batched_grid_y(max_len, chunk), 1, kBatchedThreads, 1, 1, 0, s, args, nullptr);
  }

  int host_register(void* p, size_t n, DevPtr* alias) override {
    if (!load_error_.empty()) return kErrNoDevice;
    int rc = enter(0);  // registration is process-wide (PORTABLE); any current context will do
    if (rc == 0) rc = host_register_(p, n, kHostPortable | kHostDeviceMap);
    if (rc == 0) {
      rc = host_dptr_(alias, p, 0);
      if (rc) host_unregister_(p);
    }
    return rc;
  }
  int host_unregister(void* p) override { return host_unregister_(p); }
  int host_alloc(size_t n, void** p, DevPtr* alias) override {
    int rc = enter(0);
    if (rc == 0) rc = host_alloc_(p, n, kHostPortable | kHostDeviceMap);
    if (rc == 0) {
      rc = host_dptr_(alias, *p, 0);
      if (rc) host_free_(*p);
    }
    return rc;
  }
  void host_free(void* p) override { host_free_(p); }

  int mem_alloc(int dev, size_t n, DevPtr* p) override {
    int rc = enter(dev);
    return rc ? rc : mem_alloc_(p, n);
  }
  int mem_free(DevPtr p) override { return mem_free_(p); }

  PointerInfo pointer_info(DevPtr p) override {
    PointerInfo info;
    if (!load_error_.empty()) {
      info.error = kErrNoDevice;
      return info;
    }
    unsigned type = 0;
    int rc = ptr_attr_(&type, kPtrMemoryType, p);
    if (rc) {
      info.error = rc;
      return info;
    }
    info.type = static_cast<MemType>(type);
    ptr_attr_(&info.device, kPtrDeviceOrdinal, p);
    if (info.type == MemType::kDevice && info.device >= 0 && enter(info.device) == 0) {
      size_t size = 0;
      if (addr_range_(&info.base, &size, p) == 0) info.size = size;
    }
    return info;
  }

  int dmabuf_fd(DevPtr p, size_t n, int* fd) override {
    if (!dmabuf_) return kNotSupported;
    return dmabuf_(fd, p, n, kRangeHandleDmaBufFd, 0);
  }

  std::string gpudirect_status(int dev) override {
    constexpr int kAttrGpuDirectRdma = 116;  // CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED
    int v = 0;
    CUdevice d;
    if (!usable(dev)) return "no CUDA device " + std::to_string(dev);
    if (dev_get_(&d, dev) || dev_attr_(&v, kAttrGpuDirectRdma, d)) return "the driver does not report GPUDirect RDMA support";
    return v ? "" : "device " + std::to_string(dev) + " does not support GPUDirect RDMA";
  }

  std::string error_string(int code) override {
    const char* name = nullptr;
    const char* text = nullptr;
    if (err_name_) err_name_(code, &name);
    if (err_str_) err_str_(code, &text);
    return std::string(name ? name : "CUDA error " + std::to_string(code)) + (text ? std::string(": ") + text : "");
  }

 private:
  struct Kernel {
    bool tried = false;
    CUmodule mod = nullptr;
    CUfunction fn = nullptr;
    std::string why;
  };

  bool usable(int dev) const { return load_error_.empty() && dev >= 0 && dev < ndev_; }

  // The build's fatbin first; when it was not built, or holds no code this device runs,
  // PTX for the device's architecture from NVRTC. kmu_ held.
  void load_kernel(int dev, Kernel& k) {
    k.tried = true;
    if (int rc = enter(dev)) {
      k.why = "cuCtxSetCurrent: " + error_string(rc);
      return;
    }
    size_t size = 0;
    const unsigned char* fatbin = batched_fatbin(&size);
    std::string why;
    if (size) {
      int rc = module_load_(&k.mod, fatbin);
      if (rc == 0) rc = module_fn_(&k.fn, k.mod, "dpmove_batched_copy");
      if (rc == 0) return;
      why = "the built fatbin: " + error_string(rc);
    } else {
      why = batched_fatbin_missing();
    }
    std::string cc = compute_capability(dev);
    std::string arch = "compute_" + cc.substr(0, cc.find('.')) + cc.substr(cc.find('.') + 1);
    try {
      std::string ptx = nvrtc_compile_batched(arch);
      int rc = module_load_(&k.mod, ptx.c_str());
      if (rc == 0) rc = module_fn_(&k.fn, k.mod, "dpmove_batched_copy");
      if (rc == 0) return;
      k.why = why + "; NVRTC PTX for " + arch + ": " + error_string(rc);
    } catch (const std::exception& e) {
      k.why = why + "; NVRTC: " + e.what();
    }
    k.fn = nullptr;
  }

  void* lib_ = nullptr;
  std::string load_error_;
  int ndev_ = 0;
  std::mutex mu_;  // ctx_
  std::vector<CUcontext> ctx_;
  std::mutex kmu_;  // kernel_
  std::vector<Kernel> kernel_;

  CUresult (*init_)(unsigned);
  CUresult (*dev_count_)(int*);
  CUresult (*dev_get_)(CUdevice*, int);
  CUresult (*dev_name_)(char*, int, CUdevice);
  CUresult (*dev_attr_)(int*, int, CUdevice);
  CUresult (*ctx_retain_)(CUcontext*, CUdevice);
  CUresult (*ctx_set_)(CUcontext);
  CUresult (*stream_create_)(CUstream*, unsigned);
  CUresult (*stream_destroy_)(CUstream);
  CUresult (*stream_sync_)(CUstream);
  CUresult (*event_create_)(CUevent*, unsigned);
  CUresult (*event_destroy_)(CUevent);
  CUresult (*event_record_)(CUevent, CUstream);
  CUresult (*event_query_)(CUevent);
  CUresult (*event_sync_)(CUevent);
  CUresult (*h2d_)(DevPtr, const void*, size_t, CUstream);
  CUresult (*d2h_)(void*, DevPtr, size_t, CUstream);
  CUresult (*host_register_)(void*, size_t, unsigned);
  CUresult (*host_unregister_)(void*);
  CUresult (*host_dptr_)(DevPtr*, void*, unsigned);
  CUresult (*host_alloc_)(void**, size_t, unsigned);
  CUresult (*host_free_)(void*);
  CUresult (*mem_alloc_)(DevPtr*, size_t);
  CUresult (*mem_free_)(DevPtr);
  CUresult (*ptr_attr_)(void*, int, DevPtr);
  CUresult (*addr_range_)(DevPtr*, size_t*, DevPtr);
  CUresult (*module_load_)(CUmodule*, const void*);
  CUresult (*module_fn_)(CUfunction*, CUmodule, const char*);
  CUresult (*launch_)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                      void**, void**);
  CUresult (*err_name_)(CUresult, const char**) = nullptr;
  CUresult (*err_str_)(CUresult, const char**) = nullptr;
  CUresult (*dmabuf_)(void*, DevPtr, size_t, int, unsigned long long) = nullptr;
};

}  // namespace

GpuApi& cuda_gpu() {
  static CudaGpu* g = new CudaGpu();  // never destroyed: contexts and modules outlive static teardown
  return *g;
}

bool cuda_usable(std::string* why) {
  GpuApi& g = cuda_gpu();
  std::string e = g.load_error();
  if (why) *why = e;
  return e.empty() && g.device_count() > 0;
}

}  // namespace gpu
}  // namespace dpmove
