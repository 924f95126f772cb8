// The emulated GPU: device memory in host memory, streams as FIFO worker threads, events as
// per-stream sequence numbers, the batched kernel as its span walk on the stream's thread.
//
// What it models: asynchronous execution in stream order (an event completes when every
// operation queued on its stream before it has run), the batched kernel's grid walk over the
// same descriptors a real launch reads, pointer queries that tell host, device and freed
// memory apart, per-operation failures reported through the next event (tests inject them),
// and a stall that keeps queued work from running (deadlines then expire with copies queued).
// What it does not: copy-engine concurrency limits, PCIe timing, sticky context errors.
#include <sys/mman.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "dpmove/batched_copy.h"
#include "dpmove/gpu.h"
#include "dpmove/gpu_emulated.h"

namespace dpmove {
namespace gpu {
namespace {

struct EmuStream {
  int dev;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<uint64_t, std::function<int()>>> q;  // (seq, op -> 0 | error)
  uint64_t queued = 0, done = 0, recorded = 0;
  std::vector<std::pair<uint64_t, int>> failures;  // (seq, code), pruned as events pass them
  bool stop = false;
  std::thread th;
};

struct EmuEvent {
  EmuStream* s = nullptr;
  uint64_t after = 0, seq = 0;  // covers ops (after, seq] of s
};

struct Alloc {
  size_t size;
  int dev;  // -1: registered host memory
};

class EmulatedGpu final : public GpuApi {
 public:
  const char* provider() const noexcept override { return "emulated"; }
  bool emulated() const noexcept override { return true; }
  std::string load_error() const override { return ""; }
  int device_count() override { return kEmulatedDevices; }
  std::string device_name(int dev) override { return "emulated GPU " + std::to_string(dev) + " (host memory)"; }
  std::string compute_capability(int) override { return ""; }
  int enter(int dev) override { return dev >= 0 && dev < kEmulatedDevices ? 0 : kInvalidValue; }

  int stream_create(int dev, void** out) override {
    if (enter(dev)) return kInvalidValue;
    auto* s = new EmuStream();
    s->dev = dev;
    s->th = std::thread([this, s] { run(s); });
    *out = s;
    return 0;
  }
  void stream_destroy(int, void* p) override {
    auto* s = static_cast<EmuStream*>(p);
    {
      std::lock_guard<std::mutex> lk(s->mu);
      s->stop = true;
    }
    s->cv.notify_all();
    s->th.join();
    delete s;
  }
  int stream_sync(void* sp) override {
    auto* s = static_cast<EmuStream*>(sp);
    std::unique_lock<std::mutex> lk(s->mu);
    const uint64_t target = s->queued;
    s->cv.wait(lk, [&] { return s->done >= target; });
    return 0;
  }
  int event_create(int dev, void** e) override {
    if (enter(dev)) return kInvalidValue;
    *e = new EmuEvent();
    return 0;
  }
  void event_destroy(int, void* e) override { delete static_cast<EmuEvent*>(e); }
  int event_record(void* ep, void* sp) override {
    auto* e = static_cast<EmuEvent*>(ep);
    auto* s = static_cast<EmuStream*>(sp);
    std::lock_guard<std::mutex> lk(s->mu);
    e->s = s;
    // An event covers the ops queued on its stream since the previous record there.
    e->after = s->recorded;
    e->seq = s->recorded = s->queued;
    return 0;
  }
  int event_query(void* ep) override {
    auto* e = static_cast<EmuEvent*>(ep);
    if (!e->s) return 0;
    std::lock_guard<std::mutex> lk(e->s->mu);
    return e->s->done >= e->seq ? failure(*e) : kNotReady;
  }
  int event_sync(void* ep) override {
    auto* e = static_cast<EmuEvent*>(ep);
    if (!e->s) return 0;
    std::unique_lock<std::mutex> lk(e->s->mu);
    e->s->cv.wait(lk, [&] { return e->s->done >= e->seq; });
    return failure(*e);
  }

  int memcpy_h2d(DevPtr dst, const void* src, size_t n, void* s) override {
    if (!dst || !src) return kInvalidValue;
    return push(s, [dst, src, n] {
      std::memcpy(reinterpret_cast<void*>(dst), src, n);
      return 0;
    });
  }
  int memcpy_d2h(void* dst, DevPtr src, size_t n, void* s) override {
    if (!dst || !src) return kInvalidValue;
    return push(s, [dst, src, n] {
      std::memcpy(dst, reinterpret_cast<const void*>(src), n);
      return 0;
    });
  }

  std::string kernel_status(int dev) override { return enter(dev) ? "no emulated device " + std::to_string(dev) : ""; }
  int launch_batched(int dev, DevPtr descs, uint32_t n, uint64_t max_len, void* s) override {
    if (!descs || n == 0) return kInvalidValue;
    // The grid a real launch would use; each CTA (x, y) walks its chunks as the kernel does.
    const unsigned gy = batched_grid_y(max_len, kBatchedChunk);
    return push(s, [descs, n, gy] {
      const auto* d = reinterpret_cast<const CopyDesc*>(descs);
      for (uint32_t x = 0; x < n; ++x) {
        const CopyDesc desc = d[x];
        for (unsigned cta = 0; cta < gy; ++cta)
          for (unsigned long long c = cta; c * kBatchedChunk < desc.len; c += gy) {
            unsigned long long lo = c * kBatchedChunk, hi = lo + kBatchedChunk;
            if (hi > desc.len) hi = desc.len;
            copy_span(desc, lo, hi, 0, 1);
          }
      }
      return 0;
    });
  }

  int host_register(void* p, size_t n, DevPtr* alias) override {
    std::lock_guard<std::mutex> lk(mu_);
    auto key = reinterpret_cast<DevPtr>(p);
    if (allocs_.count(key)) return 712;  // CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
    allocs_[key] = Alloc{n, -1};
    *alias = key;
    return 0;
  }
  int host_unregister(void* p) override {
    std::lock_guard<std::mutex> lk(mu_);
    return allocs_.erase(reinterpret_cast<DevPtr>(p)) ? 0 : 713;  // CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED
  }
  int host_alloc(size_t n, void** p, DevPtr* alias) override {
    void* m = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    std::lock_guard<std::mutex> lk(mu_);
    allocs_[reinterpret_cast<DevPtr>(m)] = Alloc{n, -1};
    *p = m;
    *alias = reinterpret_cast<DevPtr>(m);
    return 0;
  }
  void host_free(void* p) override {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = allocs_.find(reinterpret_cast<DevPtr>(p));
    if (it == allocs_.end()) return;
    munmap(p, it->second.size);
    allocs_.erase(it);
  }

  int mem_alloc(int dev, size_t n, DevPtr* p) override {
    if (enter(dev)) return kInvalidValue;
    if (n == 0) return kInvalidValue;
    void* m = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return 2;
    std::lock_guard<std::mutex> lk(mu_);
    *p = reinterpret_cast<DevPtr>(m);
    allocs_[*p] = Alloc{n, dev};
    forget_freed(*p, n);
    return 0;
  }
  int mem_free(DevPtr p) override {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = allocs_.find(p);
    if (it == allocs_.end() || it->second.dev < 0) return kInvalidValue;
    munmap(reinterpret_cast<void*>(p), it->second.size);
    freed_.push_back({p, it->second.size});
    if (freed_.size() > 4096) freed_.erase(freed_.begin());
    allocs_.erase(it);
    return 0;
  }

  PointerInfo pointer_info(DevPtr p) override {
    PointerInfo info;
    std::lock_guard<std::mutex> lk(mu_);
    auto it = allocs_.upper_bound(p);
    if (it != allocs_.begin()) {
      --it;
      if (p < it->first + it->second.size) {
        info.type = it->second.dev < 0 ? MemType::kHost : MemType::kDevice;
        info.device = it->second.dev < 0 ? 0 : it->second.dev;
        info.base = it->first;
        info.size = it->second.size;
        return info;
      }
    }
    for (auto& f : freed_)
      if (p >= f.first && p < f.first + f.second) {
        info.error = kInvalidValue;  // what the driver answers for freed device memory
        return info;
      }
    info.error = kForeign;
    return info;
  }

  int dmabuf_fd(DevPtr p, size_t n, int* fd) override {
    // No dma-buf exporter here: the fake verbs provider registers the address itself.
    return kNotSupported;
  }

  std::string gpudirect_status(int dev) override { return enter(dev) ? "no emulated device " + std::to_string(dev) : ""; }

  std::string error_string(int code) override {
    switch (code) {
      case 0: return "CUDA_SUCCESS (emulated)";
      case kInvalidValue: return "CUDA_ERROR_INVALID_VALUE: invalid argument (emulated)";
      case 2: return "CUDA_ERROR_OUT_OF_MEMORY: out of memory (emulated)";
      case kNotReady: return "CUDA_ERROR_NOT_READY (emulated)";
      case 700: return "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered (emulated)";
      case kNotSupported: return "CUDA_ERROR_NOT_SUPPORTED: operation not supported (emulated)";
      default: return "CUDA error " + std::to_string(code) + " (emulated)";
    }
  }

  // ---- test controls ----
  void stall(bool on) {
    {
      std::lock_guard<std::mutex> lk(ctl_mu_);
      stalled_ = on;
    }
    ctl_cv_.notify_all();
  }
  void inject(uint64_t nth, int code) {
    std::lock_guard<std::mutex> lk(ctl_mu_);
    inject_at_ = nth ? ops_run_ + nth : 0;
    inject_code_ = code;
  }
  uint64_t ops_run() {
    std::lock_guard<std::mutex> lk(ctl_mu_);
    return ops_run_;
  }

 private:
  int push(void* sp, std::function<int()> op) {
    auto* s = static_cast<EmuStream*>(sp);
    {
      std::lock_guard<std::mutex> lk(s->mu);
      s->q.emplace_back(++s->queued, std::move(op));
    }
    s->cv.notify_all();
    return 0;
  }

  void run(EmuStream* s) {
    std::unique_lock<std::mutex> lk(s->mu);
    for (;;) {
      s->cv.wait(lk, [&] { return s->stop || !s->q.empty(); });
      if (s->q.empty()) return;  // stop with nothing queued
      auto item = std::move(s->q.front());
      s->q.pop_front();
      lk.unlock();
      int rc;
      {
        std::unique_lock<std::mutex> cl(ctl_mu_);
        ctl_cv_.wait(cl, [&] { return !stalled_ || s->stop; });
        ++ops_run_;
        rc = inject_at_ && ops_run_ == inject_at_ ? inject_code_ : 0;
      }
      if (rc == 0) rc = item.second();
      lk.lock();
      if (rc) s->failures.emplace_back(item.first, rc);
      s->done = item.first;
      s->cv.notify_all();
    }
  }

  // Error of the first failed op in (after, seq] of e's stream; s->mu held.
  static int failure(const EmuEvent& e) {
    for (auto& f : e.s->failures)
      if (f.first > e.after && f.first <= e.seq) return f.second;
    return 0;
  }

  void forget_freed(DevPtr p, size_t n) {
    for (auto it = freed_.begin(); it != freed_.end();)
      it = (it->first < p + n && p < it->first + it->second) ? freed_.erase(it) : it + 1;
  }

  std::mutex mu_;
  std::map<DevPtr, Alloc> allocs_;  // emulated device allocations and registered host ranges
  std::vector<std::pair<DevPtr, size_t>> freed_;

  std::mutex ctl_mu_;
  std::condition_variable ctl_cv_;
  bool stalled_ = false;
  uint64_t ops_run_ = 0, inject_at_ = 0;
  int inject_code_ = 0;
};

EmulatedGpu& emu() {
  static EmulatedGpu* g = new EmulatedGpu();  // never destroyed: stream threads may outlive statics
  return *g;
}

}  // namespace

GpuApi& emulated_gpu() { return emu(); }

namespace emulated {
void stall(bool on) { emu().stall(on); }
void inject(uint64_t nth, int code) { emu().inject(nth, code); }
uint64_t ops_run() { return emu().ops_run(); }
}  // namespace emulated

}  // namespace gpu
}  // namespace dpmove
