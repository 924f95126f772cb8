// Host<->GPU copy backends behind the engine's "copy" QoS gate.
//
//   cuda    - one cuMemcpy{HtoD,DtoH}Async per entry on a dedicated non-blocking stream, one
//             event per submitted run; entries finish when the event completes.
//   batched - one launch of the gather/scatter kernel (batched_copy.h) per run of up to
//             kDescsPerTable entries; descriptors live in pinned, mapped host tables that are
//             reused once the launch's event completes. Host memory must be pinned (its
//             device alias is what the kernel dereferences).
//
// Both run on any GpuApi provider: the CUDA driver, or the emulated GPU on hosts without one.
// Streams: kStreamsPerDir per (device, direction), created on first use; runs are spread over
// them round-robin so copy engines in both directions overlap. A completion thread per stream
// polls its events in order (spin briefly, then back off to short sleeps).
//
// Entry contract (IoEntry of a kH2D / kD2H request): file_offset = offset in req->device(),
// region_offset = offset in req->region() (host), length > 0; validated by the engine.
// Copies cannot be cancelled once queued on a stream: a request that times out or is
// cancelled quiesces when the stream passes its copies.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dpmove/gpu.h"
#include "dpmove/request.h"

namespace dpmove {
namespace copy {

enum class Kind : int { kCuda = 0, kBatched = 1 };
const char* kind_name(Kind k) noexcept;

constexpr int kStreamsPerDir = 2;
constexpr uint32_t kDescsPerTable = 4096;

struct Stats {
  uint64_t runs = 0;          // submit() calls that queued work
  uint64_t copies = 0;        // memcpy calls (cuda) or descriptors (batched)
  uint64_t launches = 0;      // kernel launches (batched)
  uint64_t bytes = 0;         // bytes of entries finished successfully
  uint64_t errors = 0;        // entries failed by the driver
  uint64_t pageable = 0;      // copies from or to host memory that was not pinned (cuda)
  uint64_t submit_ns = 0;     // time spent in submit (driver calls included)
  uint64_t desc_tables = 0;   // pinned descriptor tables allocated (batched)
};

class Copier : public std::enable_shared_from_this<Copier> {
 public:
  Copier(gpu::GpuApi& api, Kind kind);
  ~Copier();
  Copier(const Copier&) = delete;
  Copier& operator=(const Copier&) = delete;

  Kind kind() const noexcept { return kind_; }
  gpu::GpuApi& api() const noexcept { return api_; }
  // Queues entries [begin, end) of `req` on a stream. Never blocks on the device. Entries whose
  // driver call fails at submission finish at once with -EIO (detail: the driver's error).
  void submit(const std::shared_ptr<Request>& req, size_t begin, size_t end);
  // Stops taking work, waits up to timeout_ns for queued copies to complete, stops the
  // completion threads and releases streams, events and tables. Returns the entries still
  // running: their lanes' completion threads are detached and keep finishing them as the
  // device passes them (so their requests still end), holding the Copier; their streams,
  // events and tables are leaked rather than freed under the device. Idempotent. Create
  // Copiers with make_shared.
  int64_t shutdown(int64_t timeout_ns);
  Stats stats() const;

 private:
  struct Lane;
  Lane& lane(int dev, bool d2h);
  struct Table {
    void* host;
    gpu::DevPtr alias;
  };
  Table take_table();
  void give_table(Table t);
  void complete(Lane& l);

  gpu::GpuApi& api_;
  const Kind kind_;
  std::mutex mu_;  // lanes_, tables_, stopping_
  std::map<std::pair<int, int>, std::vector<std::unique_ptr<Lane>>> lanes_;  // (dev, dir) -> lanes
  std::map<std::pair<int, int>, unsigned> next_lane_;
  std::vector<Table> tables_;  // free
  std::vector<Table> all_tables_;
  bool stopping_ = false;
  mutable std::mutex stats_mu_;
  Stats stats_;
};

}  // namespace copy
}  // namespace dpmove
