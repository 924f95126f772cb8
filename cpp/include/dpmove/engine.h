// Engine: one per process. Owns the file-I/O backend (its workers and rings), the registered
// buffer and file slot tables, and the requests' submission path.
//
// Thread safety: every public method may be called from any thread; submit() and wait() are
// meant to be called without the GIL.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "dpmove/backend.h"
#include "dpmove/copy.h"
#include "dpmove/file.h"
#include "dpmove/net.h"
#include "dpmove/qos_gate.h"
#include "dpmove/region.h"
#include "dpmove/request.h"

namespace dpmove {

struct EngineOptions {
  std::string backend = "auto";  // "auto" (io_uring where usable), "io_uring", "threadpool"
  int num_workers = 2;           // rings (io_uring) or groups of threads (thread pool)
  unsigned queue_depth = 64;     // entries in flight per worker
  bool register_buffers = true;  // io_uring fixed buffers for every region
  bool register_files = true;    // io_uring fixed files for every file
  unsigned max_registered_buffers = 1024;
  unsigned max_registered_files = 1024;
  int64_t default_timeout_ns = int64_t{60} * 1000000000;
  net::NetOptions net;  // listener settings; nothing listens until agent() is first used
  // Traffic classes and windows of the two paths (file I/O, one-sided writes). Both must
  // declare the same classes in the same order (a class id names the same class on both).
  // Empty classes: one class "bulk", QoS off. net.lanes is derived from the classes' verbs
  // markings.
  qos::GateOptions storage_qos, net_qos;
  int default_class = 0;  // what a request that names no class (-1) gets
  // GPU provider: "auto" (the CUDA driver when it sees a device, else the emulated GPU),
  // "cuda" (required), "emulated", or "off" (no device regions, no pinning).
  std::string gpu = "auto";
  // Pin (cuMemHostRegister) every host region at registration so copies can use it.
  bool pin_host = true;
  // QoS of the host<->GPU copy path (cuda and batched backends; cnic copies are RDMA writes
  // and pass the net gate). Same classes as storage_qos; empty: QoS off on this path.
  qos::GateOptions copy_qos;
};

class CopySink;

class SlotRegistry;
struct Kicker;
class StorageSink;

class Engine : public std::enable_shared_from_this<Engine> {
 public:
  // Throws SysError when backend="io_uring" was asked for and cannot run here.
  static std::shared_ptr<Engine> create(const EngineOptions& opts);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const std::string& backend_name() const noexcept { return backend_name_; }
  // Why this backend was chosen (e.g. "io_uring_setup: Operation not permitted ...").
  const std::string& backend_reason() const noexcept { return backend_reason_; }
  const EngineOptions& options() const noexcept { return opts_; }

  // Zeroed page-aligned memory owned by dpmove.
  std::shared_ptr<Region> allocate(size_t size, bool hugepages, bool register_memory);
  // Memory owned by someone else; `release` is called once when nothing uses it any more.
  std::shared_ptr<Region> wrap(uint8_t* base, size_t size, bool writable, std::function<void()> release,
                               bool register_memory, const std::string& kind);
  std::shared_ptr<File> open(const std::string& path, const OpenOptions& opts, bool register_file);

  // --- GPU ---
  // The provider chosen at create (null with gpu="off") and why.
  gpu::GpuApi* gpu() const noexcept { return gpu_; }
  const std::string& gpu_reason() const noexcept { return gpu_reason_; }
  // Device memory owned by dpmove (cuMemAlloc; emulated: host pages), `size` bytes on `device`.
  std::shared_ptr<Region> device_alloc(size_t size, int device);
  // Device memory owned by someone else (a CuPy array, a DLPack tensor): [addr, addr + size)
  // on `device`. Checks with the driver that the range is device memory of that device
  // inside one allocation (UsageError naming what it found otherwise: host memory, freed or
  // unknown memory, another device). `release` runs once when nothing uses it any more.
  std::shared_ptr<Region> wrap_device(uint64_t addr, size_t size, int device, bool writable,
                                      std::function<void()> release, const std::string& kind);
  // Queues a host<->device copy (op kH2D or kD2H) through the copy gate. Entries:
  // file_offset = offset in `device`, region_offset = offset in `host`, length.
  // backend: "auto", "cuda", "batched" or "cnic"; UsageError / UnsupportedError when it cannot
  // take this copy (with the reason), before anything moves.
  std::shared_ptr<Request> copy(OpKind op, const std::shared_ptr<Region>& device, const std::shared_ptr<Region>& host,
                                const IoEntry* entries, size_t n, int64_t timeout_ns, bool timing, int qos_class,
                                const std::string& backend);
  // "" when `backend` can copy on `device` here, else why not.
  std::string copy_backend_status(const std::string& backend, int device);
  // The backend "auto" picks for a copy of n entries of mean length mean_len on a region.
  std::string auto_copy_backend(const Region& host, int device, size_t n, int64_t mean_len);
  const std::shared_ptr<qos::Gate>& copy_gate() const noexcept { return copy_gate_; }
  std::map<std::string, copy::Stats> copy_stats() const;

  // Validates every entry (UsageError naming the entry and what was expected), then queues the
  // request. timeout_ns < 0: the engine's default; INT64_MAX: no deadline.
  // qos_class: index into the configured classes, -1 for the default class.
  std::shared_ptr<Request> submit(OpKind op, const std::shared_ptr<File>& file, const std::shared_ptr<Region>& region,
                                  const IoEntry* entries, size_t n, int64_t timeout_ns, bool timing, int qos_class = -1);

  // The QoS gates ("storage", "net"); valid until the engine is destroyed.
  const std::shared_ptr<qos::Gate>& storage_gate() const noexcept { return storage_gate_; }
  const std::shared_ptr<qos::Gate>& net_gate() const noexcept { return net_gate_; }
  // Class index for a request: qos_class, or the default for -1; UsageError when out of range.
  int resolve_class(int qos_class) const;

  // Cancels everything in flight, waits up to timeout_ns for the kernel to let go of the
  // buffers, stops the workers. Returns the entries still running (0: clean). Idempotent.
  int64_t close(int64_t timeout_ns);
  bool closed() const noexcept { return closed_.load(std::memory_order_acquire); }
  void check_open() const;

  // The receiving side of one-sided writes (listener, exposed regions, notifications) and the
  // factory of Peers. Created and started on first use. Throws ClosedError after close().
  std::shared_ptr<net::Agent> agent();

  BackendStats stats() const;
  std::map<std::string, std::string> describe() const;
  uint64_t requests_submitted() const noexcept { return next_id_->load() - 1; }

 private:
  Engine() = default;
  EngineOptions opts_;
  std::unique_ptr<Backend> backend_;
  std::string backend_name_, backend_reason_;
  std::shared_ptr<SlotRegistry> registry_;
  // Shared with the agent, whose Peers number their requests from the same counter.
  std::shared_ptr<std::atomic<uint64_t>> next_id_ = std::make_shared<std::atomic<uint64_t>>(1);
  std::mutex agent_mu_;
  std::shared_ptr<net::Agent> agent_;
  std::atomic<bool> closed_{false};
  // Shared by submit/stats/describe, exclusive in close(): the backend is never used while
  // close() tears it down. submit only try-locks (see Engine::submit).
  mutable std::shared_mutex life_mu_;
  std::shared_ptr<Kicker> kicker_;
  BackendStats final_stats_;
  std::shared_ptr<qos::Gate> storage_gate_, net_gate_;
  std::shared_ptr<StorageSink> storage_sink_;

  void pin(Memory& m);
  gpu::GpuApi* gpu_ = nullptr;
  std::string gpu_reason_;
  std::shared_ptr<copy::Copier> cuda_copier_, batched_copier_;
  std::shared_ptr<qos::Gate> copy_gate_;
  std::shared_ptr<CopySink> copy_sink_;
  std::map<std::string, copy::Stats> final_copy_stats_;

  // cnic: a verbs Peer of this engine's own agent (the loopback queue pairs), made on first
  // use, and the exposure of each Memory a cnic copy wrote into (dropped when it closes).
  std::shared_ptr<Request> cnic_copy(OpKind op, const std::shared_ptr<Region>& device,
                                     const std::shared_ptr<Region>& host, std::vector<IoEntry> v, int64_t timeout_ns,
                                     bool timing, int cls);
  net::RemoteHandle cnic_expose(const std::shared_ptr<Memory>& mem);
  std::mutex cnic_mu_;
  std::shared_ptr<net::Peer> cnic_peer_;
  std::map<const Memory*, net::RemoteHandle> cnic_exposed_;
};

// Whether the io_uring backend was compiled in.
bool uring_compiled() noexcept;

}  // namespace dpmove
