// The interface every file-I/O backend implements (io_uring, thread pool).
//
// A backend executes the entries of submitted requests with at most queue_depth entries in
// flight per worker, honours each request's deadline and cancellation (entries not yet started
// are never started once the request is terminal; running ones are cancelled where the
// mechanism allows), and reports every entry exactly once through Request::finish.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "dpmove/request.h"

namespace dpmove {

struct BackendStats {
  uint64_t entries_started = 0;
  uint64_t ops_submitted = 0;      // kernel operations (an entry can need several: short I/O, >1 GiB)
  uint64_t resubmits = 0;          // short transfers, EAGAIN, EINTR retried
  uint64_t cancels_sent = 0;       // IORING_OP_ASYNC_CANCEL issued
  uint64_t fixed_buffer_ops = 0;   // ops that used a registered buffer
  uint64_t fixed_file_ops = 0;     // ops that used a registered file
  uint64_t stale_completions = 0;  // completions that matched no running op (must stay 0)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const noexcept = 0;

  // Queues entries [begin, end) of `req` (the QoS gate hands a request over in runs). Does
  // not block on I/O. Thread-safe. Entries longer than req->max_op_bytes() are transferred in
  // pieces of at most that size, one after another.
  virtual void submit(std::shared_ptr<Request> req, size_t begin, size_t end) = 0;
  // Makes workers look at their requests now (after a cancel). Thread-safe.
  virtual void kick() noexcept = 0;

  // Registered ("fixed") buffers and files, by slot number chosen by the engine.
  // set_* return 0 or -errno and apply to every worker or none. Thread-safe.
  virtual bool fixed_buffers() const noexcept { return false; }
  virtual bool fixed_files() const noexcept { return false; }
  virtual int set_buffer(int slot, void* addr, size_t len) noexcept { return -95; /* EOPNOTSUPP */ }
  virtual void clear_buffer(int slot) noexcept {}
  virtual int set_file(int slot, int fd) noexcept { return -95; }
  virtual void clear_file(int slot) noexcept {}

  // Cancels everything queued or running, waits up to timeout_ns for running entries to end,
  // and stops the workers. Returns the number of entries still running at the end (0 on a
  // clean stop); when non-zero the backend leaks what those entries use rather than free
  // memory the kernel may still write.
  virtual int64_t shutdown(int64_t timeout_ns) = 0;

  virtual BackendStats stats() const noexcept = 0;
  // Free-form facts for `dpmove info` (ring flags, sizes).
  virtual std::map<std::string, std::string> describe() const { return {}; }
};

// Largest single kernel read/write: the kernel caps one at MAX_RW_COUNT (2 GiB - 4 KiB) and an
// SQE length is 32 bits; 1 GiB keeps every split O_DIRECT-aligned.
constexpr int64_t kMaxOpBytes = int64_t{1} << 30;
// How often one entry may be retried after EAGAIN/EINTR or a zero-byte write before it fails.
constexpr int kMaxRetries = 16;

}  // namespace dpmove
