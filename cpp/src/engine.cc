#include "dpmove/engine.h"

#include <cerrno>
#include <climits>
#include <cstring>

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
  auto r = std::make_shared<Region>(std::move(mem), 0, size);
  r->set_root(true);
  return r;
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
  if (storage_sink_) storage_sink_->detach();
  std::unique_lock<std::shared_mutex> life(life_mu_);
  // Registrations first: a Region or File dropped on another thread during the shutdown must
  // not reach rings that are going away.
  if (registry_) registry_->detach();
  if (kicker_) kicker_->detach();
  int64_t stuck = backend_ ? backend_->shutdown(timeout_ns) : 0;
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
