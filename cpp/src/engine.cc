#include "dpmove/engine.h"

#include <cerrno>
#include <climits>
#include <cstring>

#include "dpmove/gpu.h"
#include "dpmove/gpu_emulated.h"
#include "dpmove/status.h"
#include "dpmove/threadpool.h"
#if DPMOVE_HAVE_URING
#include "dpmove/uring.h"
#endif

namespace dpmove {

bool uring_compiled() noexcept { return DPMOVE_HAVE_URING != 0; }

// Slot numbers for fixed buffers and files, shared by every ring of the backend. Memory and
// File hold a weak_ptr to it, so their destructors can give slots back while the engine lives
// and do nothing after it closed.
class SlotRegistry final : public BufferRegistry, public FileRegistry {
 public:
  SlotRegistry(Backend* backend, unsigned nbuf, unsigned nfile) : backend_(backend) {
    for (unsigned i = nbuf; i > 0; --i) free_buf_.push_back(static_cast<int>(i - 1));
    for (unsigned i = nfile; i > 0; --i) free_file_.push_back(static_cast<int>(i - 1));
  }
  int register_buffer(void* addr, size_t len) override {
    std::lock_guard<std::mutex> lk(mu_);
    if (!backend_ || !backend_->fixed_buffers()) return -EOPNOTSUPP;
    if (free_buf_.empty()) return -ENOSPC;
    int slot = free_buf_.back();
    int rc = backend_->set_buffer(slot, addr, len);
    if (rc < 0) return rc;
    free_buf_.pop_back();
    return slot;
  }
  void unregister_buffer(int slot) override {
    std::lock_guard<std::mutex> lk(mu_);
    if (!backend_) return;
    backend_->clear_buffer(slot);
    free_buf_.push_back(slot);
  }
  int register_file(int fd) override {
    std::lock_guard<std::mutex> lk(mu_);
    if (!backend_ || !backend_->fixed_files()) return -EOPNOTSUPP;
    if (free_file_.empty()) return -ENOSPC;
    int slot = free_file_.back();
    int rc = backend_->set_file(slot, fd);
    if (rc < 0) return rc;
    free_file_.pop_back();
    return slot;
  }
  void unregister_file(int slot) override {
    std::lock_guard<std::mutex> lk(mu_);
    if (!backend_) return;
    backend_->clear_file(slot);
    free_file_.push_back(slot);
  }
  void detach() {
    std::lock_guard<std::mutex> lk(mu_);
    backend_ = nullptr;
  }

 private:
  std::mutex mu_;
  Backend* backend_;
  std::vector<int> free_buf_, free_file_;
};

// What a request's cancel() calls to wake the backend. Requests hold it, never the Engine, so a
// worker thread that cancels a request can never end up owning (and destroying) the Engine.
struct Kicker {
  std::mutex mu;
  Backend* backend = nullptr;  // null once the engine closes
  void kick() {
    std::lock_guard<std::mutex> lk(mu);
    if (backend) backend->kick();
  }
  void detach() {
    std::lock_guard<std::mutex> lk(mu);
    backend = nullptr;
  }
};

// The storage gate's sink: the backend, until the engine closes (then what is dispatched is
// cancelled). Separate from life_mu_: the gate's thread dispatches while close() may hold it.
class StorageSink final : public qos::Sink {
 public:
  explicit StorageSink(Backend* b) : backend_(b) {}
  void dispatch(const std::shared_ptr<Request>& req, size_t begin, size_t end, const std::shared_ptr<void>&) override {
    std::shared_lock<std::shared_mutex> lk(mu_);
    if (backend_) {
      backend_->submit(req, begin, end);
      return;
    }
    lk.unlock();
    req->cancel();
  }
  void detach() {
    std::unique_lock<std::shared_mutex> lk(mu_);
    backend_ = nullptr;
  }

 private:
  std::shared_mutex mu_;
  Backend* backend_;
};

// The copy gate's sink: the Copier named by the payload, until the engine closes.
class CopySink final : public qos::Sink {
 public:
  void dispatch(const std::shared_ptr<Request>& req, size_t begin, size_t end, const std::shared_ptr<void>& payload) override {
    std::shared_lock<std::shared_mutex> lk(mu_);
    if (!detached_) {
      static_cast<copy::Copier*>(payload.get())->submit(req, begin, end);
      return;
    }
    lk.unlock();
    req->cancel();
  }
  void detach() {
    std::unique_lock<std::shared_mutex> lk(mu_);
    detached_ = true;
  }

 private:
  std::shared_mutex mu_;
  bool detached_ = false;
};

namespace {
// Derives the verbs lanes (distinct ib_sl / roce_tclass pairs, in class order) and checks the
// two paths declare the same classes.
void setup_qos(EngineOptions& o) {
  for (auto* g : {&o.storage_qos, &o.net_qos})
    if (g->classes.empty()) {
      qos::ClassConfig c;
      c.name = "bulk";
      g->classes.push_back(c);
      g->enabled = false;
    }
  if (o.storage_qos.classes.size() != o.net_qos.classes.size())
    throw UsageError("Engine: the storage and net QoS paths must declare the same classes");
  for (size_t i = 0; i < o.storage_qos.classes.size(); ++i)
    if (o.storage_qos.classes[i].name != o.net_qos.classes[i].name)
      throw UsageError("Engine: the storage and net QoS paths must declare the same classes in the same order");
  if (o.copy_qos.classes.empty()) {
    o.copy_qos.classes = o.storage_qos.classes;
    o.copy_qos.enabled = o.storage_qos.enabled;
  }
  if (o.copy_qos.classes.size() != o.storage_qos.classes.size())
    throw UsageError("Engine: the copy and storage QoS paths must declare the same classes");
  for (size_t i = 0; i < o.copy_qos.classes.size(); ++i)
    if (o.copy_qos.classes[i].name != o.storage_qos.classes[i].name)
      throw UsageError("Engine: the copy and storage QoS paths must declare the same classes in the same order");
  if (o.default_class < 0 || static_cast<size_t>(o.default_class) >= o.storage_qos.classes.size())
    throw UsageError("Engine: default_class " + std::to_string(o.default_class) + " is not a class index");
  o.net.lanes.clear();
  for (auto& c : o.net_qos.classes) {
    net::Lane l;
    l.ib_sl = c.ib_sl;
    l.roce_tclass = c.roce_tclass;
    bool seen = false;
    for (auto& k : o.net.lanes) seen |= k.ib_sl == l.ib_sl && k.roce_tclass == l.roce_tclass;
    if (!seen) o.net.lanes.push_back(l);
  }
  if (o.net.lanes.size() > static_cast<size_t>(net::kMaxLanes))
    throw UsageError("Engine: the traffic classes name " + std::to_string(o.net.lanes.size()) +
                     " distinct (ib_sl, roce_tclass) lanes; verbs supports at most " + std::to_string(net::kMaxLanes));
}
}  // namespace

std::shared_ptr<Engine> Engine::create(const EngineOptions& opts_in) {
  EngineOptions opts = opts_in;
  setup_qos(opts);
  if (opts.num_workers < 1 || opts.num_workers > 256)
    throw UsageError("Engine: num_workers must be in [1, 256], got " + std::to_string(opts.num_workers));
  if (opts.queue_depth < 1 || opts.queue_depth > 4096)
    throw UsageError("Engine: queue_depth must be in [1, 4096], got " + std::to_string(opts.queue_depth));
  if (opts.backend != "auto" && opts.backend != "io_uring" && opts.backend != "threadpool")
    throw UsageError("Engine: backend must be 'auto', 'io_uring' or 'threadpool', got '" + opts.backend + "'");
  std::shared_ptr<Engine> e(new Engine());
  e->opts_ = opts;
  std::string uring_why;
  if (opts.backend != "threadpool") {
#if DPMOVE_HAVE_URING
    UringOptions uo;
    uo.num_workers = opts.num_workers;
    uo.queue_depth = opts.queue_depth;
    uo.max_buffers = opts.register_buffers ? opts.max_registered_buffers : 0;
    uo.max_files = opts.register_files ? opts.max_registered_files : 0;
    auto b = UringBackend::create(uo, &uring_why);
    if (b) {
      e->backend_ = std::move(b);
      e->backend_reason_ = opts.backend == "auto" ? "io_uring usable here (auto)" : "io_uring requested";
    }
#else
    uring_why = "dpmove was built without liburing (DPMOVE_WITH_URING=OFF or liburing-dev missing at build time)";
#endif
    if (!e->backend_ && opts.backend == "io_uring") throw SysError(ENOTSUP, "Engine(backend='io_uring'): " + uring_why);
  }
  if (!e->backend_) {
    // One thread per entry in flight: pread blocks, so depth needs threads.
    int threads = static_cast<int>(std::min<unsigned>(opts.num_workers * opts.queue_depth, 256));
    e->backend_ = std::make_unique<ThreadPoolBackend>(threads);
    e->backend_reason_ = opts.backend == "threadpool" ? "threadpool requested" : "fallback: " + uring_why;
  }
  e->backend_name_ = e->backend_->name();
  e->kicker_ = std::make_shared<Kicker>();
  e->kicker_->backend = e->backend_.get();
  e->registry_ = std::make_shared<SlotRegistry>(e->backend_.get(), opts.max_registered_buffers, opts.max_registered_files);
  e->storage_gate_ = std::make_shared<qos::Gate>("storage", opts.storage_qos);
  e->net_gate_ = std::make_shared<qos::Gate>("net", opts.net_qos);
  e->storage_sink_ = std::make_shared<StorageSink>(e->backend_.get());
  std::string cuda_why;
  if (opts.gpu == "cuda" || opts.gpu == "auto") {
    if (gpu::cuda_usable(&cuda_why)) {
      e->gpu_ = &gpu::cuda_gpu();
      e->gpu_reason_ = opts.gpu == "cuda" ? "CUDA requested" : "CUDA driver sees a device (auto)";
    } else if (opts.gpu == "cuda") {
      throw UnsupportedError(ENODEV, "Engine(gpu='cuda'): " + cuda_why);
    }
  }
  if (!e->gpu_ && (opts.gpu == "auto" || opts.gpu == "emulated")) {
    e->gpu_ = &gpu::emulated_gpu();
    e->gpu_reason_ = opts.gpu == "emulated" ? "emulated GPU requested" : "emulated GPU (auto): " + cuda_why;
  }
  if (opts.gpu == "off") e->gpu_reason_ = "GPU off (gpu='off')";
  else if (!e->gpu_) throw UsageError("Engine: gpu must be 'auto', 'cuda', 'emulated' or 'off', got '" + opts.gpu + "'");
  if (e->gpu_) {
    e->cuda_copier_ = std::make_shared<copy::Copier>(*e->gpu_, copy::Kind::kCuda);
    e->batched_copier_ = std::make_shared<copy::Copier>(*e->gpu_, copy::Kind::kBatched);
  }
  e->copy_gate_ = std::make_shared<qos::Gate>("copy", opts.copy_qos);
  e->copy_sink_ = std::make_shared<CopySink>();
  return e;
}

Engine::~Engine() { close(int64_t{10} * 1000000000); }

void Engine::check_open() const {
  if (closed()) throw ClosedError("Engine is closed");
}

std::shared_ptr<Region> Engine::allocate(size_t size, bool hugepages, bool register_memory) {
  check_open();
  auto mem = Memory::allocate(size, hugepages);
  if (register_memory && opts_.register_buffers) mem->register_with(registry_);
  if (gpu_ && opts_.pin_host) pin(*mem);
  auto r = std::make_shared<Region>(std::move(mem), 0, size);
  r->set_root(true);
  return r;
}

std::shared_ptr<Region> Engine::wrap(uint8_t* base, size_t size, bool writable, std::function<void()> release,
                                     bool register_memory, const std::string& kind) {
  auto mem = std::make_shared<Memory>(base, size, writable, std::move(release), kind);
  check_open();  // after taking ownership, so `release` runs even when this throws
  if (size == 0) throw UsageError("register: buffer is empty (0 bytes)");
  if (register_memory && opts_.register_buffers) mem->register_with(registry_);
  if (gpu_ && opts_.pin_host) pin(*mem);
  auto r = std::make_shared<Region>(std::move(mem), 0, size);
  r->set_root(true);
  return r;
}

void Engine::pin(Memory& m) {
  constexpr int kAlreadyRegistered = 712;  // CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
  gpu::DevPtr alias = 0;
  int rc = gpu_->host_register(m.base(), m.size(), &alias);
  if (rc == kAlreadyRegistered) {
    // Pinned by someone else (another engine, the application): usable for copies, not ours
    // to unpin. With unified addressing (every 64-bit CUDA platform) the device alias of
    // registered host memory is its host address.
    m.set_pinned(reinterpret_cast<uint64_t>(m.base()), nullptr);
    return;
  }
  if (rc) {
    m.set_pin_error("cuMemHostRegister(" + std::to_string(m.size()) + " bytes): " + gpu_->error_string(rc));
    return;
  }
  gpu::GpuApi* api = gpu_;
  void* p = m.base();
  m.set_pinned(alias, [api, p] { api->host_unregister(p); });
}

namespace {
std::string mem_kind(gpu::GpuApi& g) { return g.emulated() ? "emulated" : "cuda"; }

void check_device(gpu::GpuApi* g, int device) {
  if (!g) throw UnsupportedError(ENODEV, "this Engine has no GPU (gpu='off')");
  if (device < 0 || device >= g->device_count())
    throw UsageError("device " + std::to_string(device) + " does not exist: " + std::to_string(g->device_count()) + " " +
                     (g->emulated() ? "emulated " : "CUDA ") + "device(s) here");
}
}  // namespace

std::shared_ptr<Region> Engine::device_alloc(size_t size, int device) {
  check_open();
  check_device(gpu_, device);
  if (size == 0) throw UsageError("device_alloc: size must be > 0 bytes");
  gpu::DevPtr p = 0;
  if (int rc = gpu_->mem_alloc(device, size, &p))
    throw SysError(ENOMEM, "device_alloc(" + std::to_string(size) + " bytes on device " + std::to_string(device) +
                               "): " + gpu_->error_string(rc));
  gpu::GpuApi* g = gpu_;
  auto mem = std::make_shared<Memory>(reinterpret_cast<uint8_t*>(p), size, true, [g, p] { g->mem_free(p); }, mem_kind(*g));
  mem->set_device(g, device);
  auto r = std::make_shared<Region>(std::move(mem), 0, size);
  r->set_root(true);
  return r;
}

std::shared_ptr<Region> Engine::wrap_device(uint64_t addr, size_t size, int device, bool writable,
                                            std::function<void()> release, const std::string& kind) {
  auto mem = std::make_shared<Memory>(reinterpret_cast<uint8_t*>(addr), size, writable, std::move(release), kind);
  check_open();  // after taking ownership, so `release` runs even when this throws
  if (!gpu_) throw UnsupportedError(ENODEV, "register_device: this Engine has no GPU (gpu='off')");
  if (device != -1) check_device(gpu_, device);
  if (size == 0) throw UsageError("register_device: the array is empty (0 bytes)");
  if (addr == 0) throw UsageError("register_device: the array's data pointer is NULL");
  gpu::PointerInfo info = gpu_->pointer_info(addr);
  const std::string where = "register_device: address 0x" + [&] {
    char b[32];
    snprintf(b, sizeof b, "%llx", static_cast<unsigned long long>(addr));
    return std::string(b);
  }();
  if (info.type == gpu::MemType::kHost)
    throw UsageError(where + " is host memory, not device memory; register host memory with Engine.register");
  if (info.type == gpu::MemType::kUnknown && !(gpu_->emulated() && info.error == gpu::kForeign))
    throw UsageError(where + " is not memory the CUDA driver knows (" + gpu_->error_string(info.error) +
                     "); was the array freed?");
  if (info.type == gpu::MemType::kManaged || info.type == gpu::MemType::kArray)
    throw UsageError(where + " is " + (info.type == gpu::MemType::kManaged ? "managed (unified)" : "CUDA array") +
                     " memory; only plain device memory (cuMemAlloc, CuPy, torch) can be registered");
  if (device == -1) device = info.type == gpu::MemType::kDevice ? info.device : 0;
  if (info.type == gpu::MemType::kDevice) {
    if (info.device != device)
      throw UsageError(where + " is on device " + std::to_string(info.device) + ", not device " + std::to_string(device));
    if (info.size && (addr < info.base || addr + size > info.base + info.size))
      throw UsageError(where + " + " + std::to_string(size) + " bytes runs past the end of its allocation (" +
                       std::to_string(info.base + info.size - addr) + " bytes left)");
  }
  mem->set_device(gpu_, device);
  auto r = std::make_shared<Region>(std::move(mem), 0, size);
  r->set_root(true);
  return r;
}

std::string Engine::copy_backend_status(const std::string& backend, int device) {
  if (!gpu_) return "this Engine has no GPU (gpu='off')";
  if (device < 0 || device >= gpu_->device_count()) return "no device " + std::to_string(device);
  if (backend == "cuda" || backend == "auto") return "";  // auto falls back to cuda
  if (backend == "batched") return gpu_->kernel_status(device);
  if (backend == "cnic") {
    std::string why;
    if (!net::verbs_usable(&why)) return "no usable verbs device (" + why + ")";
    why = gpu_->gpudirect_status(device);
    return why.empty() ? "" : "GPUDirect RDMA: " + why;
  }
  return "unknown copy backend '" + backend + "' (expected 'auto', 'cuda', 'batched' or 'cnic')";
}

std::string Engine::auto_copy_backend(const Region& host, int device, size_t n, int64_t mean_len) {
  // One launch wins over n copy-engine submissions once per-copy submission cost dominates:
  // several blocks, each small enough that the copy engine's per-copy cost matters.
  constexpr size_t kMinBatch = 4;
  constexpr int64_t kMaxMeanLen = 4 << 20;
  // DualPath's path where the hardware has it: the copy is an RDMA write through the GPU's NIC,
  // so the NIC's traffic classes govern it. Never picked for an emulated GPU (ask for it).
  if (!gpu_->emulated() && copy_backend_status("cnic", device).empty()) return "cnic";
  if (n >= kMinBatch && mean_len <= kMaxMeanLen && host.memory()->pinned() && gpu_->kernel_status(device).empty())
    return "batched";
  return "cuda";
}

std::shared_ptr<Request> Engine::copy(OpKind op, const std::shared_ptr<Region>& device,
                                      const std::shared_ptr<Region>& host, const IoEntry* entries, size_t n,
                                      int64_t timeout_ns, bool timing, int qos_class, const std::string& backend) {
  std::shared_lock<std::shared_mutex> life(life_mu_, std::try_to_lock);
  if (!life.owns_lock() || closed()) throw ClosedError("Engine is closed");
  const char* what = op == OpKind::kH2D ? "copy (host to device)" : "copy (device to host)";
  if (op != OpKind::kH2D && op != OpKind::kD2H) throw UsageError("copy: op must be h2d or d2h");
  if (!device || !host) throw UsageError(std::string(what) + ": expected a device Region and a host Region, got None");
  device->check_open();
  host->check_open();
  if (!gpu_) throw UnsupportedError(ENODEV, std::string(what) + ": this Engine has no GPU (gpu='off')");
  if (!device->memory()->is_device())
    throw UsageError(std::string(what) + ": the device side is host memory; pass a region from Engine.device_alloc "
                     "or Engine.register_device");
  if (host->memory()->is_device())
    throw UsageError(std::string(what) + ": the host side is device memory; device-to-device copies are not supported");
  if (device->memory()->gpu_api() != gpu_)
    throw UsageError(std::string(what) + ": the device region belongs to another GPU provider (" +
                     device->memory()->gpu_api()->provider() + "; this engine uses " + gpu_->provider() + ")");
  if (op == OpKind::kH2D && !device->writable())
    throw UsageError(std::string(what) + ": the device region is read-only");
  if (op == OpKind::kD2H && !host->writable())
    throw UsageError(std::string(what) + ": the host region is read-only and cannot be the target of a copy");
  const int cls = resolve_class(qos_class);
  const int dev = device->memory()->device();
  const uint64_t dsize = device->size(), hsize = host->size();
  std::vector<IoEntry> v(entries, entries + n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const IoEntry& e = v[i];
    auto where = [&] {
      return "entry " + std::to_string(i) + " (device_offset=" + std::to_string(e.file_offset) +
             ", host_offset=" + std::to_string(e.region_offset) + ", length=" + std::to_string(e.length) + ")";
    };
    if (e.file_offset < 0 || e.region_offset < 0) throw UsageError(where() + ": offsets must be >= 0");
    if (e.length <= 0) throw UsageError(where() + ": length must be > 0 bytes");
    if (static_cast<uint64_t>(e.file_offset) > dsize || static_cast<uint64_t>(e.length) > dsize - e.file_offset)
      throw UsageError(where() + ": does not fit in the device region of " + std::to_string(dsize) + " bytes");
    if (static_cast<uint64_t>(e.region_offset) > hsize || static_cast<uint64_t>(e.length) > hsize - e.region_offset)
      throw UsageError(where() + ": does not fit in the host region of " + std::to_string(hsize) + " bytes");
    total += e.length;
  }
  std::string chosen = backend;
  if (backend == "auto") chosen = auto_copy_backend(*host, dev, n, n ? total / static_cast<int64_t>(n) : 0);
  std::string why = copy_backend_status(chosen, dev);
  if (!why.empty()) throw UnsupportedError(ENOTSUP, std::string(what) + " with backend '" + chosen + "': " + why);
  if (chosen == "cnic") {
    life.unlock();  // cnic_copy goes through agent(), which takes its own locks and may connect
    return cnic_copy(op, device, host, std::move(v), timeout_ns, timing, cls);
  }
  std::shared_ptr<copy::Copier> copier = chosen == "batched" ? batched_copier_ : cuda_copier_;
  if (chosen == "batched" && !host->memory()->pinned())
    throw UsageError(std::string(what) + " with backend 'batched': the host region is not pinned (" +
                     (host->memory()->pin_error().empty() ? "allocated before pinning, or pin_host=False"
                                                          : host->memory()->pin_error()) +
                     "); the kernel reads host memory through its device mapping. Use backend='cuda'");
  int64_t now = now_ns();
  if (timeout_ns < 0) timeout_ns = opts_.default_timeout_ns;
  int64_t deadline = (timeout_ns == INT64_MAX || now > INT64_MAX - timeout_ns) ? INT64_MAX : now + timeout_ns;
  std::string target = mem_kind(*gpu_) + ":" + std::to_string(dev) + " via " + chosen;
  std::shared_ptr<Request> req(
      new Request(next_id_->fetch_add(1), op, nullptr, host, std::move(v), deadline, timing, target, device));
  copy_gate_->submit(req, cls, copy_sink_, copier, false);
  return req;
}

net::RemoteHandle Engine::cnic_expose(const std::shared_ptr<Memory>& mem) {
  // cnic_mu_ held.
  auto it = cnic_exposed_.find(mem.get());
  if (it != cnic_exposed_.end()) return it->second;
  auto whole = std::make_shared<Region>(mem, 0, mem->size());
  net::RemoteHandle h = agent()->expose(whole, true);
  cnic_exposed_[mem.get()] = h;
  // The exposure holds the memory: give it up when the application closes the region.
  std::weak_ptr<Engine> self = weak_from_this();
  const Memory* key = mem.get();
  mem->on_close([self, key, h] {
    auto e = self.lock();
    if (!e) return;
    std::shared_ptr<net::Agent> a;
    {
      std::lock_guard<std::mutex> lk(e->cnic_mu_);
      e->cnic_exposed_.erase(key);
      std::lock_guard<std::mutex> lk2(e->agent_mu_);
      a = e->agent_;
    }
    if (a) a->unexpose(h.key);
  });
  return h;
}

std::shared_ptr<Request> Engine::cnic_copy(OpKind op, const std::shared_ptr<Region>& device,
                                           const std::shared_ptr<Region>& host, std::vector<IoEntry> v,
                                           int64_t timeout_ns, bool timing, int cls) {
  if (timeout_ns < 0) timeout_ns = opts_.default_timeout_ns;
  std::shared_ptr<net::Peer> peer;
  net::RemoteHandle dst;
  {
    std::lock_guard<std::mutex> lk(cnic_mu_);
    if (!cnic_peer_) {
      auto a = agent();
      net::ConnectOptions o;
      o.transport = "verbs";
      cnic_peer_ = a->connect(a->metadata(), o);
    }
    peer = cnic_peer_;
    // The written side is exposed whole; entries are re-based from the views to the memory.
    const std::shared_ptr<Region>& target = op == OpKind::kH2D ? device : host;
    dst = cnic_expose(target->memory());
  }
  const int64_t dev_base = static_cast<int64_t>(device->offset_in_memory());
  const int64_t host_base = static_cast<int64_t>(host->offset_in_memory());
  // Put entries: file_offset = offset in the exposed (written) memory, region_offset = offset
  // in the local (read) region.
  for (IoEntry& e : v) {
    const int64_t doff = e.file_offset, hoff = e.region_offset;
    if (op == OpKind::kH2D) {
      e.file_offset = dev_base + doff;
      e.region_offset = hoff;
    } else {
      e.file_offset = host_base + hoff;
      e.region_offset = doff;
    }
  }
  const std::shared_ptr<Region>& src = op == OpKind::kH2D ? host : device;
  return peer->put(src, dst, v.data(), v.size(), nullptr, 0, false, timeout_ns, timing, cls);
}

std::map<std::string, copy::Stats> Engine::copy_stats() const {
  std::shared_lock<std::shared_mutex> lk(life_mu_, std::try_to_lock);
  if (!lk.owns_lock() || closed()) return final_copy_stats_;
  std::map<std::string, copy::Stats> m;
  if (cuda_copier_) m["cuda"] = cuda_copier_->stats();
  if (batched_copier_) m["batched"] = batched_copier_->stats();
  return m;
}

std::shared_ptr<File> Engine::open(const std::string& path, const OpenOptions& o, bool register_file) {
  check_open();
  auto f = File::open(path, o);
  if (register_file && opts_.register_files) f->register_with(registry_);
  return f;
}

namespace {
std::string entry_str(size_t i, const IoEntry& e) {
  return "entry " + std::to_string(i) + " (file_offset=" + std::to_string(e.file_offset) +
         ", region_offset=" + std::to_string(e.region_offset) + ", length=" + std::to_string(e.length) + ")";
}
}  // namespace

std::shared_ptr<Request> Engine::submit(OpKind op, const std::shared_ptr<File>& file,
                                        const std::shared_ptr<Region>& region, const IoEntry* entries, size_t n,
                                        int64_t timeout_ns, bool timing, int qos_class) {
  // try-lock: a thread that holds the GIL must not wait for close(), whose workers may need
  // the GIL to give a Python buffer back.
  std::shared_lock<std::shared_mutex> life(life_mu_, std::try_to_lock);
  if (!life.owns_lock() || closed()) throw ClosedError("Engine is closed");
  if (!file) throw UsageError("expected a File, got None");
  if (!region) throw UsageError("expected a Region, got None");
  if (region->memory()->is_device())
    throw UsageError(std::string(op_name(op)) + ": the region is device memory; file I/O moves host memory "
                     "(read into a host region, then copy it to the device)");
  file->check_open();
  region->check_open();
  // Registered-file and registered-buffer slot numbers are per engine: another engine's slot
  // would name a different file or buffer on this engine's rings.
  if (file->registered_elsewhere(registry_.get()))
    throw UsageError("'" + file->path() + "' was opened by another Engine, whose registered-file slot it holds; "
                     "open it with this Engine (or with register=False to share it)");
  if (region->memory()->registered_elsewhere(registry_.get()))
    throw UsageError("the region is registered with another Engine, whose fixed-buffer slots it holds; "
                     "allocate or register it with this Engine (or with register=False to share it)");
  if (op == OpKind::kRead && !file->readable())
    throw UnsupportedError(EBADF, "read: '" + file->path() + "' was opened write-only (mode='w'); open it with mode='r' or 'rw'");
  if (op == OpKind::kWrite && !file->writable())
    throw UnsupportedError(EBADF, "write: '" + file->path() + "' was opened read-only (mode='r'); open it with mode='w' or 'rw'");
  if (op == OpKind::kRead && !region->writable())
    throw UsageError("read: the region is read-only and cannot be the target of a read; register a writable buffer");
  const int cls = resolve_class(qos_class);

  const uint64_t rsize = region->size();
  const bool direct = file->direct();
  const uint64_t oalign = file->offset_align(), malign = file->mem_align();
  const uintptr_t base = reinterpret_cast<uintptr_t>(region->data());
  // Validate the copy, not the caller's array: with the GIL released another thread could
  // change the array between a check and a copy.
  std::vector<IoEntry> copy(entries, entries + n);
  for (size_t i = 0; i < n; ++i) {
    const IoEntry& e = copy[i];
    if (e.file_offset < 0 || e.region_offset < 0)
      throw UsageError(entry_str(i, e) + ": offsets must be >= 0");
    if (e.length <= 0) throw UsageError(entry_str(i, e) + ": length must be > 0 bytes");
    if (e.file_offset > INT64_MAX - e.length)
      throw UsageError(entry_str(i, e) + ": file_offset + length overflows a 64-bit file offset");
    if (static_cast<uint64_t>(e.region_offset) > rsize || static_cast<uint64_t>(e.length) > rsize - e.region_offset)
      throw UsageError(entry_str(i, e) + ": does not fit in the region of " + std::to_string(rsize) + " bytes");
    if (direct) {
      if (e.file_offset % oalign || e.length % oalign)
        throw UsageError(entry_str(i, e) + ": '" + file->path() + "' is open with O_DIRECT, which needs file_offset and length to be multiples of " +
                         std::to_string(oalign) + " bytes (open with direct=False for unaligned I/O)");
      if ((base + e.region_offset) % malign)
        throw UsageError(entry_str(i, e) + ": O_DIRECT needs the memory address to be a multiple of " + std::to_string(malign) +
                         " bytes; this region starts " + std::to_string((base + e.region_offset) % malign) +
                         " bytes past such a boundary (use Engine.alloc for aligned memory)");
    }
  }
  int64_t now = now_ns();
  if (timeout_ns < 0) timeout_ns = opts_.default_timeout_ns;
  int64_t deadline = (timeout_ns == INT64_MAX || now > INT64_MAX - timeout_ns) ? INT64_MAX : now + timeout_ns;
  // Not make_shared: the deadline heaps hold weak_ptrs, which would pin the whole object.
  std::shared_ptr<Request> req(new Request(next_id_->fetch_add(1), op, file, region, std::move(copy), deadline, timing));
  req->set_kick([k = kicker_] { k->kick(); });
  storage_gate_->submit(req, cls, storage_sink_, nullptr, false);
  return req;
}

int Engine::resolve_class(int qos_class) const {
  if (qos_class == -1) return opts_.default_class;
  if (qos_class < 0 || static_cast<size_t>(qos_class) >= opts_.storage_qos.classes.size())
    throw UsageError("traffic class index " + std::to_string(qos_class) + " is out of range [0, " +
                     std::to_string(opts_.storage_qos.classes.size()) + ")");
  return qos_class;
}

std::shared_ptr<net::Agent> Engine::agent() {
  std::lock_guard<std::mutex> lk(agent_mu_);
  check_open();
  if (!agent_) {
    auto ids = next_id_;
    auto a = std::make_shared<net::Agent>(opts_.net, [ids] { return ids->fetch_add(1); });
    a->set_qos(net_gate_, opts_.default_class);
    a->start();
    agent_ = std::move(a);
  }
  return agent_;
}

int64_t Engine::close(int64_t timeout_ns) {
  if (closed_.exchange(true)) return 0;
  std::shared_ptr<net::Agent> agent;
  {
    std::lock_guard<std::mutex> lk(agent_mu_);
    agent = agent_;
  }
  // Peers first (their requests end with ECONNABORTED), then the listener.
  if (agent) agent->close();
  // Gates before the backend: what still waits in a gate is cancelled, and nothing reaches the
  // backend once the sink is detached.
  if (net_gate_) net_gate_->close();
  if (storage_gate_) storage_gate_->close();
  if (copy_gate_) copy_gate_->close();
  if (storage_sink_) storage_sink_->detach();
  if (copy_sink_) copy_sink_->detach();
  std::unique_lock<std::shared_mutex> life(life_mu_);
  // Registrations first: a Region or File dropped on another thread during the shutdown must
  // not reach rings that are going away.
  if (registry_) registry_->detach();
  if (kicker_) kicker_->detach();
  int64_t stuck = backend_ ? backend_->shutdown(timeout_ns) : 0;
  // Copies cannot be recalled from a stream: wait for them like for the kernel's I/O.
  for (auto* c : {&cuda_copier_, &batched_copier_})
    if (*c) {
      int64_t left = (*c)->shutdown(timeout_ns);
      final_copy_stats_[copy::kind_name((*c)->kind())] = (*c)->stats();
      stuck += left;
    }
  if (backend_) final_stats_ = backend_->stats();
  if (stuck) backend_.release();  // keep what the kernel or a blocked thread may still write into
  backend_.reset();
  return stuck;
}

BackendStats Engine::stats() const {
  // try-lock for the same reason as submit(); while close() runs there is nothing to report.
  std::shared_lock<std::shared_mutex> lk(life_mu_, std::try_to_lock);
  if (!lk.owns_lock() || closed() || !backend_) return final_stats_;
  return backend_->stats();
}

std::map<std::string, std::string> Engine::describe() const {
  std::shared_lock<std::shared_mutex> lk(life_mu_, std::try_to_lock);
  std::map<std::string, std::string> d;
  if (lk.owns_lock() && !closed() && backend_) d = backend_->describe();
  d["backend"] = backend_name_;
  d["reason"] = backend_reason_;
  return d;
}

}  // namespace dpmove
