#include "dpmove/threadpool.h"

#include <unistd.h>

#include <cerrno>
#include <climits>

#include "dpmove/file.h"
#include "dpmove/region.h"
#include "dpmove/status.h"

namespace dpmove {

ThreadPoolBackend::ThreadPoolBackend(int num_threads) : live_threads_(num_threads), num_threads_(num_threads) {
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { run(); });
}

ThreadPoolBackend::~ThreadPoolBackend() { shutdown(INT64_MAX); }

void ThreadPoolBackend::submit(std::shared_ptr<Request> req, size_t begin, size_t end) {
  if (begin >= end) return;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!stop_) {
      queue_.push_back({std::move(req), begin, end});
      req = nullptr;
    }
  }
  if (req) {
    req->cancel();  // shut down: nothing will run it
    return;
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
      if (queue_.empty()) {  // stop_ and nothing left
        if (--live_threads_ == 0) exit_cv_.notify_all();
        return;
      }
      Item& it = queue_.front();
      req = it.req;
      i = it.next++;
      if (it.next == it.end) queue_.pop_front();
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
    if (done > 0 && req.terminal()) {  // a > 1 GiB entry: stop between chunks once cancelled
      req.finish(i, req.state() == ReqState::kTimedOut ? -ETIMEDOUT : -ECANCELED, done);
      return;
    }
    size_t len = static_cast<size_t>(std::min({e.length - done, kMaxOpBytes, req.max_op_bytes()}));
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
    if (done < e.length && static_cast<size_t>(r) < len) {
      // O_DIRECT transfers only stop short at end of file (read) or on a device error
      // (write); the remainder would start misaligned, so report instead of retrying.
      if (f.direct() && ((e.file_offset + done) % f.offset_align() != 0 ||
                         reinterpret_cast<uintptr_t>(buf + done) % f.mem_align() != 0)) {
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
    if (stop_) return stuck_;
    stop_ = true;
    dropped.swap(queue_);
  }
  for (auto& it : dropped) it.req->cancel();
  cv_.notify_all();
  // A thread blocked in pread (a hung NFS or FUSE server, a dead device) cannot be
  // interrupted: wait up to timeout_ns, then detach the threads and report them.
  int64_t until = (timeout_ns > INT64_MAX - now_ns()) ? INT64_MAX : now_ns() + timeout_ns;
  std::unique_lock<std::mutex> lk(mu_);
  while (live_threads_ > 0) {
    int64_t now = now_ns();
    if (now >= until) break;
    exit_cv_.wait_for(lk, std::chrono::nanoseconds(std::min<int64_t>(until - now, 100'000'000)));
  }
  stuck_ = live_threads_;
  lk.unlock();
  for (auto& t : threads_) {
    if (stuck_ == 0) t.join();
    else t.detach();  // the owner leaks this backend, which the threads still use
  }
  threads_.clear();
  return stuck_;
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
