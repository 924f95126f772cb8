// Thread-pool backend: pread/pwrite on worker threads. Serves the same API where io_uring is
// not built, disabled by sysctl, or refused by seccomp. A running pread cannot be cancelled:
// after cancel or timeout, quiesced() turns true when the running calls return.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "dpmove/backend.h"

namespace dpmove {

class ThreadPoolBackend final : public Backend {
 public:
  explicit ThreadPoolBackend(int num_threads);
  // Runs only after a clean shutdown (no thread left running).
  ~ThreadPoolBackend() override;
  const char* name() const noexcept override { return "threadpool"; }
  void submit(std::shared_ptr<Request> req, size_t begin, size_t end) override;
  void kick() noexcept override {}
  int64_t shutdown(int64_t timeout_ns) override;
  BackendStats stats() const noexcept override;
  std::map<std::string, std::string> describe() const override;

 private:
  struct Item {
    std::shared_ptr<Request> req;
    size_t next, end;
  };
  void run();
  void execute(Request& req, size_t i);

  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable exit_cv_;
  int live_threads_;   // threads not yet returned from run(); guarded by mu_
  int64_t stuck_ = 0;  // threads still running when shutdown gave up
  std::deque<Item> queue_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
  int num_threads_;
  std::atomic<uint64_t> started_{0}, ops_{0}, resubmits_{0};
};

// Executes entry i of `req` with blocking pread/pwrite (the entry must already be started).
// Shared by the thread pool; returns after Request::finish.
void execute_blocking(Request& req, size_t i, std::atomic<uint64_t>& ops, std::atomic<uint64_t>& resubmits);

}  // namespace dpmove
