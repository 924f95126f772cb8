// Gate: the admission point of one path (an engine's storage I/O, or its network writes).
// Every operation of the path passes through its gate, which decides when the operation is
// handed to the backend or transport (the Sink).
//
// An operation is a range of one request's entries, all of one traffic class. "In flight"
// means bytes dispatched whose entries have not ended yet (finished or swept), kept per class.
// With QoS on, the gate dispatches in the Arbiter's order (starvation bound, strict priority,
// byte-weighted DRR, token buckets) while
//   - the path's total in flight is below inflight_bytes, and
//   - for classes below the top level, their in flight is below low_inflight_bytes.
// A window with room takes one more operation even when it overshoots (an operation larger
// than a window still goes). The low window holds only while the top level is active (see
// reserve_idle_ns), so KV alone gets the whole path. The low window reserves the rest of the path for the top level,
// as DualPath's weighted round robin reserves ~99 % of the NIC for model traffic: a top-level
// operation never waits in the gate behind lower-level work, while the starvation bound keeps
// lower levels moving when the top level alone fills the total window. Work-conserving: a
// class with nothing queued or no tokens never holds another back.
//
// With QoS off (enabled = false) the gate is one FIFO: every operation is dispatched at once in
// arrival order, with no window, rate limit or reordering; counters are still kept. It is the
// baseline `dpmove bench qos` compares against.
//
// Threads: submit() dispatches on the caller's thread. Entry ends (any thread, possibly under a
// backend's lock) only update counters and wake the gate's thread, which dispatches what freed
// windows and refilled buckets allow, and applies the deadlines of requests still queued.
// Sinks are never called under the gate's lock.
#pragma once

#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <queue>
#include <string>
#include <thread>
#include <vector>

#include "dpmove/qos.h"

namespace dpmove {

class Request;

namespace qos {

struct GateOptions {
  std::vector<ClassConfig> classes;  // index = class id used by submit()
  int64_t starvation_bound_ns = 20'000'000;
  uint64_t quantum_bytes = 64 * 1024;
  bool enabled = true;
  uint64_t inflight_bytes = 0;      // all classes; 0: no window
  uint64_t low_inflight_bytes = 0;  // classes below the top level; 0: no window
  // The low window holds while the top level is active: something of it in flight, or its
  // last submit or completion less than this long ago. After that the low levels may fill
  // the path (work-conserving); the first top-level op to come back closes it again.
  // 0: the low window always holds.
  int64_t reserve_idle_ns = 100'000'000;
  // Largest single kernel operation of a below-top class while the top level is active
  // (storage: an entry is read or written in pieces of at most this many bytes, one after
  // another, so the device never holds more than this of one low-priority entry ahead of a
  // latency-critical one). 0: no limit.
  uint64_t low_chunk_bytes = 0;
};

// Where dispatched operations go.
class Sink {
 public:
  virtual ~Sink() = default;
  // Hands entries [begin, end) of `req` on. Must not block on I/O; every entry must end
  // (finished, or swept by the request's cancel / deadline). `payload` is what submit() got.
  virtual void dispatch(const std::shared_ptr<Request>& req, size_t begin, size_t end,
                        const std::shared_ptr<void>& payload) = 0;
};

struct GateClassStats {
  ClassStats arb;               // arbitration counters (QoS on), wait = time queued in the gate
  uint64_t bytes = 0, ops = 0;  // dispatched (both modes)
  uint64_t inflight_bytes = 0;  // dispatched, entries not ended
  uint64_t queued_bytes = 0;    // waiting in the gate
};

class Gate : public std::enable_shared_from_this<Gate> {
 public:
  // Throws UsageError on a bad configuration.
  Gate(std::string path, GateOptions opts);
  ~Gate();
  Gate(const Gate&) = delete;
  Gate& operator=(const Gate&) = delete;

  const std::string& path() const noexcept { return path_; }
  const GateOptions& options() const noexcept { return opts_; }
  size_t num_classes() const noexcept { return opts_.classes.size(); }
  int find(const std::string& name) const;  // -1 when unknown
  bool top(int cls) const { return opts_.classes.at(static_cast<size_t>(cls)).level == top_level_; }
  // Kernel-operation size cap for entries of this class (INT64_MAX: none).
  int64_t max_op_bytes(int cls) const;
  // Whether the top level is active now (something of it in flight, or seen within
  // reserve_idle_ns): the low window and low_chunk apply only then. Lock-free; a backend asks
  // it before each piece of a chunked entry, so KV alone is read in whole entries.
  bool top_active(int64_t now) const noexcept {
    return opts_.reserve_idle_ns == 0 || top_inflight_.load(std::memory_order_relaxed) > 0 ||
           now - top_seen_ns_.load(std::memory_order_relaxed) < opts_.reserve_idle_ns;
  }

  // Queues `req` (class `cls`, entries all pending) and dispatches what may go now. whole:
  // the request is one operation (network writes: one END/ACK per request); otherwise runs of
  // consecutive entries of about quantum_bytes each. Attaches the request to the gate, so its
  // entries report their end. After close(): the request is cancelled.
  void submit(const std::shared_ptr<Request>& req, int cls, std::shared_ptr<Sink> sink,
              std::shared_ptr<void> payload, bool whole);

  // An entry of class `cls` with `bytes` bytes ended after being dispatched (Request calls it).
  void release(int cls, uint64_t bytes) noexcept;
  // `req` (class `cls`) ended: its operations still queued leave the queue without being
  // charged to the class's token bucket (Request calls it when it sweeps).
  void purge(const Request* req, int cls) noexcept;

  // Stops the thread and cancels every request still queued. Idempotent.
  void close();

  GateClassStats stats(int cls) const;
  uint64_t inflight_bytes() const;

 private:
  struct Item {
    std::shared_ptr<Request> req;
    std::shared_ptr<Sink> sink;
    std::shared_ptr<void> payload;
    uint32_t begin = 0, end = 0;
    int cls = -1;
    uint64_t bytes = 0;
  };
  // Pops what may go now into `out`, and the items of requests that ended while queued into
  // `drop` (destroyed by the caller after unlocking). Caller holds dispatch_mu_ and mu_.
  void pump_locked(int64_t now, std::vector<Item>* out, std::vector<Item>* drop);
  void dispatch_all(std::vector<Item>& items);
  void prune_deadlines_locked();
  void run();

  const std::string path_;
  const GateOptions opts_;
  int top_level_ = 0;

  // Held from taking operations off the queue until they are handed to their sinks (QoS on),
  // so they reach a sink in the order they left the queue: puts of one class from one thread
  // keep their order on the wire whichever thread dispatches them. Taken before mu_.
  std::mutex dispatch_mu_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unique_ptr<Arbiter> arb_;  // QoS on only
  std::vector<Item> slab_;        // queued operations, indexed by the arbiter's op id
  std::vector<uint32_t> free_;
  std::vector<uint64_t> inflight_, queued_bytes_, bytes_, ops_;
  uint64_t inflight_total_ = 0, inflight_low_ = 0;
  // Written under mu_, read without it (top_active): bytes of top-level classes in flight,
  // and the last submit or entry end of a top-level class.
  std::atomic<uint64_t> top_inflight_{0};
  std::atomic<int64_t> top_seen_ns_{INT64_MIN / 2};
  void sync_top_locked() noexcept {
    top_inflight_.store(inflight_total_ - inflight_low_, std::memory_order_relaxed);
  }
  bool pump_ = false, stop_ = false, closed_ = false;
  using DL = std::pair<int64_t, std::weak_ptr<Request>>;
  struct DLCmp {
    bool operator()(const DL& a, const DL& b) const { return a.first > b.first; }
  };
  std::priority_queue<DL, std::vector<DL>, DLCmp> deadlines_;  // of queued requests
  std::thread thread_;
};

}  // namespace qos
}  // namespace dpmove
