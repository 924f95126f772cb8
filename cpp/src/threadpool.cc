#include "dpmove/threadpool.h"

#include <unistd.h>

#include <cerrno>

#include "dpmove/file.h"
#include "dpmove/region.h"
#include "dpmove/status.h"

namespace dpmove {

ThreadPoolBackend::ThreadPoolBackend(int num_threads) : num_threads_(num_threads) {
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { run(); });
}

ThreadPoolBackend::~ThreadPoolBackend() { shutdown(0); }

void ThreadPoolBackend::submit(std::shared_ptr<Request> req) {
  if (req->size() == 0) return;
  {
    std::lock_guard<std::mutex> lk(mu_);
    queue_.push_back({std::move(req), 0});
  }
  cv_.notify_all();
}

void ThreadPoolBackend::run() {
  for (;;) {
    std::shared_ptr<Request> req;
    size_t i;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      Item& it = queue_.front();
      req = it.req;
      i = it.next++;
      if (it.next == req->size()) queue_.pop_front();
    }
    req->poll();  // applies the deadline: an expired request's entries are swept, not started
    if (!req->start(i)) continue;
    started_.fetch_add(1, std::memory_order_relaxed);
    execute_blocking(*req, i, ops_, resubmits_);
  }
}

void execute_blocking(Request& req, size_t i, std::atomic<uint64_t>& ops, std::atomic<uint64_t>& resubmits) {
  const IoEntry& e = req.entry(i);
  File& f = *req.file();
  uint8_t* buf = req.region()->data() + e.region_offset;
  const bool is_read = req.op() == OpKind::kRead;
  int64_t done = 0;
  int retries = 0;
  req.set_start_time(i, now_ns());
  while (done < e.length) {
    size_t len = static_cast<size_t>(std::min(e.length - done, kMaxOpBytes));
    ops.fetch_add(1, std::memory_order_relaxed);
    ssize_t r = is_read ? pread(f.fd(), buf + done, len, e.file_offset + done)
                        : pwrite(f.fd(), buf + done, len, e.file_offset + done);
    if (r < 0) {
      int err = errno;
      if ((err == EINTR || err == EAGAIN) && ++retries <= kMaxRetries) {
        resubmits.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      req.finish(i, -err, done);
      return;
    }
    if (r == 0) {
      if (is_read) {
        req.finish(i, kEntryShort, done);
        return;
      }
      if (++retries > kMaxRetries) {
        req.finish(i, -EIO, done);
        return;
      }
      resubmits.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    done += r;
    if (done < e.length) {
      // O_DIRECT transfers only stop short at end of file (read) or on a device error
      // (write); the remainder would start misaligned, so report instead of retrying.
      if (f.direct() && (e.file_offset + done) % f.offset_align() != 0) {
        req.finish(i, is_read ? kEntryShort : -EIO, done);
        return;
      }
      resubmits.fetch_add(1, std::memory_order_relaxed);
    }
  }
  req.finish(i, kEntryOk, done);
}

int64_t ThreadPoolBackend::shutdown(int64_t timeout_ns) {
  std::deque<Item> dropped;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_ && threads_.empty()) return 0;
    stop_ = true;
    dropped.swap(queue_);
  }
  for (auto& it : dropped) it.req->cancel();
  cv_.notify_all();
  // A thread blocked in pread cannot be interrupted; joining waits for the call to return.
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
  return 0;
}

BackendStats ThreadPoolBackend::stats() const noexcept {
  BackendStats s;
  s.entries_started = started_.load();
  s.ops_submitted = ops_.load();
  s.resubmits = resubmits_.load();
  return s;
}

std::map<std::string, std::string> ThreadPoolBackend::describe() const {
  return {{"threads", std::to_string(num_threads_)}, {"syscalls", "pread/pwrite"}};
}

}  // namespace dpmove
