// io_uring backend: one ring per worker thread, each thread the only submitter and reaper of
// its ring.
//
// Per worker: a sparse table of registered buffers and files (the same slot numbers on every
// ring, so a request can run on any worker); an eventfd read kept armed so that submit(),
// kick() and shutdown() wake a worker blocked in io_uring_enter; at most queue_depth entries
// in flight. Completions are matched to operations by (slot, generation) in user_data, so a
// completion can never finish an entry twice or a later entry that reused the slot.
//
// Short transfers resubmit the remainder (reads that reach end of file finish as
// kEntryShort); -EAGAIN / -EINTR are retried up to kMaxRetries; any other -errno finishes the
// entry with that errno. When a request becomes terminal (deadline or cancel) its queued
// entries are never started and its running ones get IORING_OP_ASYNC_CANCEL.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "dpmove/backend.h"

namespace dpmove {

struct UringOptions {
  int num_workers = 2;
  unsigned queue_depth = 64;  // max entries in flight per worker
  unsigned max_buffers = 1024;  // registered buffer slots per ring (0: none)
  unsigned max_files = 1024;    // registered file slots per ring (0: none)
};

class UringWorker;

class UringBackend final : public Backend {
 public:
  // Returns nullptr and sets *why when a ring cannot be created here.
  static std::unique_ptr<UringBackend> create(const UringOptions& opts, std::string* why);
  ~UringBackend() override;

  const char* name() const noexcept override { return "io_uring"; }
  void submit(std::shared_ptr<Request> req, size_t begin, size_t end) override;
  void kick() noexcept override;
  bool fixed_buffers() const noexcept override { return fixed_buffers_; }
  bool fixed_files() const noexcept override { return fixed_files_; }
  int set_buffer(int slot, void* addr, size_t len) noexcept override;
  void clear_buffer(int slot) noexcept override;
  int set_file(int slot, int fd) noexcept override;
  void clear_file(int slot) noexcept override;
  int64_t shutdown(int64_t timeout_ns) override;
  BackendStats stats() const noexcept override;
  std::map<std::string, std::string> describe() const override;

 private:
  UringBackend() = default;
  void clear_buffer_one(size_t worker, int slot) noexcept;
  UringOptions opts_;
  std::vector<std::unique_ptr<UringWorker>> workers_;
  bool fixed_buffers_ = false;
  bool fixed_files_ = false;
  std::string setup_flags_;
  std::atomic<uint64_t> rr_{0};
  bool shut_ = false;
};

// Facts about io_uring on this host, for `dpmove info`.
struct UringProbe {
  bool usable = false;
  std::string reason;  // why not usable, or "ok"
  std::map<std::string, std::string> facts;
};
UringProbe probe_uring();

}  // namespace dpmove
