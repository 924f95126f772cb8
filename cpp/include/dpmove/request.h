// A batch of transfer entries with one deadline and one terminal state.
//
// Life cycle of an entry (status[i], int32):
//   kEntryPending --start()--> kEntryRunning --finish()--> 0 | kEntryShort | -errno
//   kEntryPending --sweep on cancel/timeout--> -ECANCELED | -ETIMEDOUT   (never started)
// Each transition is a compare-and-swap, so an entry is started at most once and finished at
// most once; a second finish is refused and counted (duplicate_finishes(), always 0 unless a
// backend is broken).
//
// Request state: kPending until either every entry finished (kDone when all are 0, else
// kFailed) or the deadline passed (kTimedOut) or cancel() was called (kCancelled); the first
// of these wins and the state never changes again. kTimedOut and kCancelled can be reached
// while entries are still kEntryRunning: quiesced() tells when none is, i.e. when no I/O of
// this request can touch its buffers any more and every entry has its final status (the
// never-started ones swept to -ECANCELED / -ETIMEDOUT). kDone and kFailed are always quiesced.
//
// Thread safety: every method may be called from any thread.
#pragma once

#include <atomic>
#include <climits>
#include <condition_variable>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace dpmove {

class File;
class Region;
namespace qos {
class Gate;
}

enum class ReqState : int { kPending = 0, kDone = 1, kFailed = 2, kTimedOut = 3, kCancelled = 4 };
// kPut: a one-sided write into a peer's exposed region (file() is null, target() names the peer).
// kH2D / kD2H: copies between host memory (region()) and device memory (device()); entries'
// file_offset is the offset in the device region.
enum class OpKind : uint8_t { kRead = 0, kWrite = 1, kPut = 2, kH2D = 3, kD2H = 4 };

const char* state_name(ReqState s) noexcept;
const char* op_name(OpKind op) noexcept;

// One row of a batch: bytes [file_offset, +length) <-> region bytes [region_offset, +length).
struct IoEntry {
  int64_t file_offset;
  int64_t region_offset;
  int64_t length;
};
static_assert(sizeof(IoEntry) == 24, "IoEntry must match an (N, 3) int64 array row");

int64_t now_ns() noexcept;  // CLOCK_MONOTONIC

class Request {
 public:
  // deadline_ns: absolute CLOCK_MONOTONIC time, or INT64_MAX for none.
  Request(uint64_t id, OpKind op, std::shared_ptr<File> file, std::shared_ptr<Region> region,
          std::vector<IoEntry> entries, int64_t deadline_ns, bool timing, std::string target = {},
          std::shared_ptr<Region> device = nullptr);

  uint64_t id() const noexcept { return id_; }
  OpKind op() const noexcept { return op_; }
  const std::shared_ptr<File>& file() const noexcept { return file_; }
  const std::shared_ptr<Region>& region() const noexcept { return region_; }
  // The device side of a kH2D / kD2H copy; null otherwise.
  const std::shared_ptr<Region>& device() const noexcept { return device_; }
  // What the request moves bytes to or from, for messages: the file path, or the peer and
  // remote region of a kPut.
  const std::string& target() const noexcept { return target_; }
  size_t size() const noexcept { return entries_.size(); }
  const IoEntry& entry(size_t i) const noexcept { return entries_[i]; }
  int64_t deadline_ns() const noexcept { return deadline_ns_; }
  bool timing() const noexcept { return timing_; }

  // --- backend side ---
  // Claims entry i for execution. False when it was already swept (cancelled / timed out):
  // the backend must then not touch it.
  bool start(size_t i) noexcept;
  // Records the outcome of a started entry. Returns false (and counts a duplicate) when the
  // entry was not running.
  bool finish(size_t i, int32_t status, int64_t bytes) noexcept;
  void set_start_time(size_t i, int64_t t) noexcept { if (timing_) t_start_[i] = t; }

  // --- caller side ---
  ReqState state() const noexcept { return static_cast<ReqState>(state_.load(std::memory_order_acquire)); }
  bool terminal() const noexcept { return state() != ReqState::kPending; }
  // Applies the deadline if it has passed; returns state().
  ReqState poll() noexcept;
  // True when kCancelled was set by this call; then tells the backend (kick hook) so running
  // entries get cancelled in the kernel now rather than at their completion.
  bool cancel() noexcept;
  void set_kick(std::function<void()> kick) { kick_ = std::move(kick); }
  // Blocks until terminal (true) or until timeout_ns elapses (false); applies the deadline.
  // Call without the GIL.
  bool wait(int64_t timeout_ns) noexcept;
  // Blocks until terminal and no entry is running (true) or timeout (false).
  bool wait_quiesced(int64_t timeout_ns) noexcept;
  // Once true, stays true. unfinished_ counts entries neither finished nor swept, so it is 0
  // exactly when no entry runs and none can start (start() needs a kEntryPending status).
  // running_ is not consulted: a start() that backs off raises it for a moment, even after
  // the request quiesced.
  bool quiesced() const noexcept {
    return state_.load(std::memory_order_seq_cst) != static_cast<int>(ReqState::kPending) &&
           unfinished_.load(std::memory_order_seq_cst) == 0;
  }

  // Entries handed to the kernel or a thread and not finished; 0 once quiesced.
  int64_t running() const noexcept { return quiesced() ? 0 : running_.load(std::memory_order_acquire); }
  int64_t unfinished() const noexcept { return unfinished_.load(std::memory_order_acquire); }
  int64_t failed() const noexcept { return failed_.load(std::memory_order_acquire); }
  int64_t bytes_done() const noexcept { return bytes_done_.load(std::memory_order_acquire); }
  int64_t duplicate_finishes() const noexcept { return duplicates_.load(std::memory_order_relaxed); }

  // Copies of the per-entry arrays (N,), safe to call at any time.
  void copy_status(int32_t* out) const noexcept;
  void copy_bytes(int64_t* out) const noexcept;
  // Per-entry latency (ns) from first submission to completion; -1 where not measured.
  void copy_latency(int64_t* out) const noexcept;
  // A transport's explanation of a failure (e.g. "peer X closed the connection"); the first
  // one set is kept. Empty when none.
  void set_detail(const std::string& d);
  std::string detail() const;

  // First entry whose status is not 0 (index, status), or (-1, 0).
  std::pair<int64_t, int32_t> first_failure() const noexcept;

  // --- QoS (qos::Gate) ---
  // Ties the request to the gate of its path before it is shared: every entry the gate
  // dispatched reports its end (finish or sweep) to gate.release exactly once.
  void qos_attach(std::shared_ptr<qos::Gate> gate, int cls, int64_t max_op_bytes);
  int qos_class() const noexcept { return qos_cls_; }
  // Largest single kernel operation for this request's next piece (backends split longer
  // entries): its class's low_chunk while the gate's top level is active, else no limit.
  int64_t max_op_bytes() const noexcept;
  // The gate marks [begin, end) dispatched; returns the bytes of those entries that had
  // already ended (swept while queued), which the gate must not count as in flight.
  uint64_t qos_dispatched(size_t begin, size_t end) noexcept;

 private:
  bool set_terminal(ReqState s) noexcept;  // CAS from kPending; the caller notifies
  void sweep(int32_t status) noexcept;     // kEntryPending -> status for all entries
  void notify() noexcept;

  const uint64_t id_;
  const OpKind op_;
  const std::shared_ptr<File> file_;
  const std::shared_ptr<Region> region_;
  const std::shared_ptr<Region> device_;
  const std::vector<IoEntry> entries_;
  const std::string target_;
  const int64_t deadline_ns_;
  const bool timing_;

  std::unique_ptr<std::atomic<int32_t>[]> status_;
  std::unique_ptr<int64_t[]> bytes_;  // written by the finishing thread before status
  std::unique_ptr<int64_t[]> t_start_, t_end_;

  std::atomic<int> state_{0};
  std::atomic<int64_t> unfinished_;
  std::atomic<int64_t> running_{0};
  std::atomic<int64_t> failed_{0};
  std::atomic<int64_t> bytes_done_{0};
  std::atomic<int64_t> duplicates_{0};

  // Per entry: bit 1 dispatched by the gate, bit 2 ended. Whoever sets the second bit
  // releases the entry's bytes, so a release happens once whatever the order.
  std::unique_ptr<std::atomic<uint8_t>[]> qos_flags_;
  std::shared_ptr<qos::Gate> gate_;
  int qos_cls_ = -1;
  int64_t max_op_bytes_ = INT64_MAX;
  void qos_ended(size_t i) noexcept;

  std::string detail_;  // guarded by mu_
  std::function<void()> kick_;  // set before the request is shared; read-only afterwards

  mutable std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace dpmove
