#include "dpmove/uring.h"

#include <liburing.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <queue>
#include <thread>

#include "dpmove/file.h"
#include "dpmove/region.h"
#include "dpmove/status.h"

namespace dpmove {

namespace {

// Not ~0: liburing reserves LIBURING_UDATA_TIMEOUT (~0) for its internal timeouts. Operation
// tags are (generation << 32 | slot) with slot < queue_depth, so these never collide with one.
constexpr uint64_t kWakeTag = ~uint64_t{0} - 0x10;
constexpr uint64_t kCancelTag = ~uint64_t{0} - 0x11;

unsigned next_pow2(unsigned v) {
  unsigned p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Creates a ring with the flags that help us where the kernel has them; falls back to none.
int init_ring(io_uring* ring, unsigned entries, std::string* flags_used) {
  io_uring_params p;
  std::memset(&p, 0, sizeof(p));
  // SUBMIT_ALL: a bad SQE does not stop the rest of the batch from being submitted.
  // COOP_TASKRUN: completions are delivered when we enter the kernel anyway, no IPIs.
  p.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN;
  p.cq_entries = entries * 2;
  p.flags |= IORING_SETUP_CQSIZE;
  int rc = io_uring_queue_init_params(entries, ring, &p);
  if (rc == -EINVAL) {
    std::memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = entries * 2;
    rc = io_uring_queue_init_params(entries, ring, &p);
    if (flags_used && rc == 0) *flags_used = "CQSIZE";
  } else if (flags_used && rc == 0) {
    *flags_used = "SUBMIT_ALL|COOP_TASKRUN|CQSIZE";
  }
  return rc;
}

}  // namespace

class UringWorker {
 public:
  UringWorker(unsigned queue_depth) : qd_(queue_depth) {}

  int init(unsigned max_buffers, unsigned max_files, bool* fixed_bufs, bool* fixed_files, std::string* flags) {
    // Between two submits the worker can queue one SQE per slot (fills and retries share the
    // qd slots), one cancel per slot and the eventfd read: 2 * qd + 1. The CQ is twice the SQ.
    int rc = init_ring(&ring_, next_pow2(2 * qd_ + 2), flags);
    if (rc < 0) return rc;
    ring_ok_ = true;
    wake_fd_ = eventfd(0, EFD_CLOEXEC);
    if (wake_fd_ < 0) return -errno;
    *fixed_bufs = max_buffers && io_uring_register_buffers_sparse(&ring_, max_buffers) == 0;
    *fixed_files = max_files && io_uring_register_files_sparse(&ring_, max_files) == 0;
    slots_.resize(qd_);
    for (unsigned i = 0; i < qd_; ++i) free_.push_back(qd_ - 1 - i);
    return 0;
  }

  void start() { thread_ = std::thread([this] { run(); }); }

  // Runs only after a clean exit (no operation left in the kernel); a worker that could not
  // drain is leaked by UringBackend::shutdown instead of destroyed.
  ~UringWorker() {
    if (thread_.joinable()) thread_.join();
    if (ring_ok_) io_uring_queue_exit(&ring_);
    if (wake_fd_ >= 0) close(wake_fd_);
  }

  void push(std::shared_ptr<Request> req, size_t begin, size_t end) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (!stop_) {
        incoming_.push_back({std::move(req), begin, end});
        req = nullptr;
      }
    }
    if (req) {
      req->cancel();  // stopping: nothing will run it
      return;
    }
    // Only a worker about to block needs the eventfd; an awake one drains incoming_ at the top
    // of its loop. The mutex orders this push before the exchange, and the worker publishes
    // sleeping_ before it checks incoming_ under the same mutex, so one of the two sees the
    // other: the item is never stranded.
    if (sleeping_.exchange(false, std::memory_order_seq_cst)) wake();
  }

  void kick() {
    scan_.store(true, std::memory_order_release);
    wake();
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    wake();
  }

  // Returns the entries still running once the thread has exited or the timeout passed.
  int64_t join(int64_t timeout_ns) {
    int64_t now = now_ns();
    int64_t until = timeout_ns > INT64_MAX - now ? INT64_MAX : now + timeout_ns;
    std::unique_lock<std::mutex> lk(mu_);
    // Slices: wait_for with a huge duration overflows inside libstdc++ and returns at once.
    while (!exited_ && (now = now_ns()) < until)
      exit_cv_.wait_for(lk, std::chrono::nanoseconds(std::min<int64_t>(until - now, 100'000'000)));
    bool exited = exited_;
    lk.unlock();
    if (exited) {
      if (thread_.joinable()) thread_.join();
      return inflight_ops_;
    }
    // Still waiting for the kernel: detach; the ring and its buffers are leaked on purpose.
    thread_.detach();
    return std::max<int64_t>(1, running_snapshot_.load());
  }

  io_uring* ring() { return &ring_; }

  std::atomic<uint64_t> a_started{0}, a_ops{0}, a_resubmits{0}, a_cancels{0}, a_fixbuf{0}, a_fixfile{0}, a_stale{0};

 private:
  struct Item {
    std::shared_ptr<Request> req;
    size_t next, end;
  };
  struct Slot {
    std::shared_ptr<Request> req;  // null when free
    size_t entry = 0;
    int64_t done = 0;  // bytes of the entry transferred so far
    unsigned len = 0;  // bytes asked of the operation in flight
    uint32_t gen = 0;
    int retries = 0;
    bool cancel_sent = false;
  };

  void wake() {
    uint64_t one = 1;
    // The counter cannot come near overflow (the worker reads it on every wake), so this write
    // neither blocks nor fails in practice; a lost write would still be followed by the next.
    ssize_t r = write(wake_fd_, &one, sizeof(one));
    (void)r;
  }

  // The SQ is sized for the most SQEs one loop pass queues (see init), so the first call
  // succeeds; the loop only guards against a submit that the kernel refused for a moment.
  io_uring_sqe* get_sqe() {
    for (;;) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe) return sqe;
      int rc = io_uring_submit(&ring_);
      if (rc == -EBUSY || rc == -EAGAIN) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  void arm_wake() {
    io_uring_sqe* sqe = get_sqe();
    io_uring_prep_read(sqe, wake_fd_, &wake_buf_, sizeof(wake_buf_), 0);
    io_uring_sqe_set_data64(sqe, kWakeTag);
    armed_wake_read_ = true;
  }

  static uint64_t tag(uint32_t slot, uint32_t gen) { return (uint64_t{gen} << 32) | slot; }

  void prep(uint32_t si) {
    Slot& s = slots_[si];
    Request& r = *s.req;
    const IoEntry& e = r.entry(s.entry);
    const File& f = *r.file();
    const Region& reg = *r.region();
    unsigned len = static_cast<unsigned>(std::min({e.length - s.done, kMaxOpBytes, r.max_op_bytes()}));
    uint8_t* buf = reg.data() + e.region_offset + s.done;
    uint64_t off = static_cast<uint64_t>(e.file_offset + s.done);
    int fd = f.fixed_slot();
    const bool fixed_file = fd >= 0;
    if (!fixed_file) fd = f.fd();
    s.len = len;
    int bi = reg.memory()->find_slot(reg.offset_in_memory() + e.region_offset + s.done, len);
    io_uring_sqe* sqe = get_sqe();
    if (r.op() == OpKind::kRead) {
      if (bi >= 0) io_uring_prep_read_fixed(sqe, fd, buf, len, off, bi);
      else io_uring_prep_read(sqe, fd, buf, len, off);
    } else {
      if (bi >= 0) io_uring_prep_write_fixed(sqe, fd, buf, len, off, bi);
      else io_uring_prep_write(sqe, fd, buf, len, off);
    }
    if (fixed_file) sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, tag(si, s.gen));
    ++inflight_ops_;
    a_ops.fetch_add(1, std::memory_order_relaxed);
    if (bi >= 0) a_fixbuf.fetch_add(1, std::memory_order_relaxed);
    if (fixed_file) a_fixfile.fetch_add(1, std::memory_order_relaxed);
  }

  void release(uint32_t si) {
    Slot& s = slots_[si];
    s.req.reset();  // may drop the last reference to the request and its region
    ++s.gen;
    free_.push_back(si);
    running_snapshot_.store(static_cast<int64_t>(qd_ - free_.size()), std::memory_order_relaxed);
  }

  void finish(uint32_t si, int32_t status) {
    Slot& s = slots_[si];
    s.req->finish(s.entry, status, s.done);
    release(si);
  }

  // Starts queued entries while there is room.
  void fill() {
    while (!pending_.empty() && !free_.empty()) {
      Item& it = pending_.front();
      if (it.next == it.end) {
        pending_.pop_front();
        continue;
      }
      size_t i = it.next++;
      if (!it.req->start(i)) continue;  // swept by cancel or deadline
      uint32_t si = free_.back();
      free_.pop_back();
      Slot& s = slots_[si];
      s.req = it.req;
      s.entry = i;
      s.done = 0;
      s.retries = 0;
      s.cancel_sent = false;
      s.req->set_start_time(i, now_ns());
      a_started.fetch_add(1, std::memory_order_relaxed);
      prep(si);
      if (it.next == it.end) pending_.pop_front();
    }
    running_snapshot_.store(static_cast<int64_t>(qd_ - free_.size()), std::memory_order_relaxed);
  }

  void retry(uint32_t si) {
    a_resubmits.fetch_add(1, std::memory_order_relaxed);
    prep(si);
  }

  void complete(io_uring_cqe* cqe) {
    uint64_t ud = io_uring_cqe_get_data64(cqe);
    if (ud == kWakeTag) {
      armed_wake_read_ = false;
      woken_ = true;
      return;
    }
    if (ud == kCancelTag) return;  // outcome of a cancel: the target op reports itself
    uint32_t si = static_cast<uint32_t>(ud);
    uint32_t gen = static_cast<uint32_t>(ud >> 32);
    if (si >= slots_.size() || !slots_[si].req || slots_[si].gen != gen) {
      a_stale.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    --inflight_ops_;
    Slot& s = slots_[si];
    Request& r = *s.req;
    const IoEntry& e = r.entry(s.entry);
    const bool is_read = r.op() == OpKind::kRead;
    const int res = cqe->res;
    const int32_t stopped = r.state() == ReqState::kTimedOut ? -ETIMEDOUT : -ECANCELED;

    if (res == -EAGAIN || res == -EINTR) {
      if (++s.retries <= kMaxRetries && !r.terminal()) return retry(si);
      return finish(si, r.terminal() ? stopped : res);
    }
    if (res < 0) return finish(si, res);
    if (res == 0) {
      if (is_read) return finish(si, kEntryShort);
      if (++s.retries <= kMaxRetries && !r.terminal()) return retry(si);
      return finish(si, r.terminal() ? stopped : -EIO);
    }
    s.done += res;
    if (s.done == e.length) return finish(si, kEntryOk);
    if (r.terminal()) return finish(si, stopped);  // partial: bytes say how far it got
    // A full piece of an entry split by max_op_bytes (QoS) or kMaxOpBytes: the next piece.
    if (static_cast<unsigned>(res) == s.len) return prep(si);
    // O_DIRECT transfers stop short only at end of file (read) or on a device error (write);
    // the remainder would start misaligned, so report rather than resubmit.
    const uintptr_t next_addr = reinterpret_cast<uintptr_t>(r.region()->data() + e.region_offset + s.done);
    if (r.file()->direct() &&
        ((e.file_offset + s.done) % r.file()->offset_align() != 0 || next_addr % r.file()->mem_align() != 0))
      return finish(si, is_read ? kEntryShort : -EIO);
    retry(si);
  }

  void drain_incoming() {
    std::vector<Item> got;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (incoming_.empty() && stopping_ == stop_) return;
      got.swap(incoming_);
      if (stop_ && !stopping_) woken_ = true;  // first sight of stop: scan() cancels everything
      stopping_ = stop_;
    }
    for (auto& it : got) {
      if (it.req->deadline_ns() != INT64_MAX) deadlines_.push({it.req->deadline_ns(), it.req});
      pending_.push_back(std::move(it));
    }
  }

  // Applies due deadlines and sends ASYNC_CANCEL for running ops of terminal requests.
  void scan(int64_t now) {
    while (!deadlines_.empty() && deadlines_.top().first <= now) {
      if (auto r = deadlines_.top().second.lock()) r->poll();
      deadlines_.pop();
    }
    if (stopping_) {
      for (auto& it : pending_) it.req->cancel();
      for (auto& s : slots_)
        if (s.req) s.req->cancel();
    }
    for (uint32_t si = 0; si < slots_.size(); ++si) {
      Slot& s = slots_[si];
      if (!s.req || s.cancel_sent || !s.req->terminal()) continue;
      io_uring_sqe* sqe = get_sqe();
      io_uring_prep_cancel64(sqe, tag(si, s.gen), 0);
      io_uring_sqe_set_data64(sqe, kCancelTag);
      s.cancel_sent = true;
      a_cancels.fetch_add(1, std::memory_order_relaxed);
    }
  }

  void run() {
    arm_wake();
    for (;;) {
      drain_incoming();
      if (woken_) {
        woken_ = false;
        if (stopping_ || scan_.exchange(false, std::memory_order_acq_rel)) scan(now_ns());
      }
      // Due deadlines before fill(), so an already expired request never starts an entry.
      if (!deadlines_.empty() && deadlines_.top().first <= now_ns()) scan(now_ns());
      if (stopping_ && inflight_ops_ == 0) {
        // Everything queued was cancelled in scan(); nothing is running any more.
        for (auto& it : pending_) it.req->cancel();
        pending_.clear();
        break;
      }
      if (!stopping_ && !ring_error_) fill();
      if (!armed_wake_read_) arm_wake();

      __kernel_timespec ts{};
      __kernel_timespec* tsp = nullptr;
      int64_t now = now_ns();
      if (!deadlines_.empty()) {
        int64_t dt = std::max<int64_t>(0, deadlines_.top().first - now);
        ts.tv_sec = dt / 1000000000;
        ts.tv_nsec = dt % 1000000000;
        tsp = &ts;
      }
      io_uring_cqe* cqe = nullptr;
      sleeping_.store(true, std::memory_order_seq_cst);
      bool more;
      {
        std::lock_guard<std::mutex> lk(mu_);
        more = !incoming_.empty() || stop_;
      }
      int rc;
      if (more) {  // work arrived meanwhile: submit what is prepared, do not block
        sleeping_.store(false, std::memory_order_relaxed);
        rc = io_uring_submit(&ring_);
      } else {
        rc = io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, tsp, nullptr);
        sleeping_.store(false, std::memory_order_relaxed);
      }
      if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EBUSY && rc != -EAGAIN) {
        // The ring refused to enter (e.g. -ENOMEM): start nothing new and end the requests so
        // waiters return, but keep every running slot - the kernel may still complete into
        // those buffers - until its completion arrives. Retry entering after a pause.
        if (!ring_error_) {
          for (auto& it : pending_) it.req->cancel();
          pending_.clear();
          for (auto& sl : slots_)
            if (sl.req) sl.req->cancel();
        }
        ring_error_ = rc;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      } else {
        ring_error_ = 0;
      }
      unsigned head, count = 0;
      io_uring_for_each_cqe(&ring_, head, cqe) {
        complete(cqe);
        ++count;
      }
      io_uring_cq_advance(&ring_, count);
      now = now_ns();
      if (!deadlines_.empty() && deadlines_.top().first <= now) scan(now);
      else if (scan_.exchange(false, std::memory_order_acq_rel)) scan(now);
    }
    std::lock_guard<std::mutex> lk(mu_);
    exited_ = true;
    exit_cv_.notify_all();
  }

  io_uring ring_{};
  bool ring_ok_ = false;
  int wake_fd_ = -1;
  uint64_t wake_buf_ = 0;
  bool armed_wake_read_ = false;
  bool woken_ = true;  // drain once at start
  unsigned qd_;
  std::thread thread_;

  std::mutex mu_;
  std::condition_variable exit_cv_;
  std::vector<Item> incoming_;
  bool stop_ = false;
  bool exited_ = false;
  std::atomic<bool> scan_{false};
  std::atomic<bool> sleeping_{false};  // the worker may be blocked in io_uring_enter

  // Owned by the worker thread.
  bool stopping_ = false;
  int ring_error_ = 0;  // last io_uring_enter failure; 0 once entering works again
  std::deque<Item> pending_;
  std::vector<Slot> slots_;
  std::vector<uint32_t> free_;
  int64_t inflight_ops_ = 0;
  std::atomic<int64_t> running_snapshot_{0};
  using DL = std::pair<int64_t, std::weak_ptr<Request>>;
  struct DLCmp {
    bool operator()(const DL& a, const DL& b) const { return a.first > b.first; }
  };
  std::priority_queue<DL, std::vector<DL>, DLCmp> deadlines_;
};

std::unique_ptr<UringBackend> UringBackend::create(const UringOptions& opts, std::string* why) {
  if (opts.num_workers < 1 || opts.queue_depth < 1)
    throw UsageError("io_uring backend: num_workers and queue_depth must be >= 1");
  // The worker loop needs IORING_FEAT_EXT_ARG (wait with a timeout without an internal
  // TIMEOUT request) and the READ/WRITE/ASYNC_CANCEL opcodes; older kernels use the pool.
  UringProbe probe = probe_uring();
  if (!probe.usable) {
    if (why) *why = probe.reason;
    return nullptr;
  }
  std::unique_ptr<UringBackend> b(new UringBackend());
  b->opts_ = opts;
  bool all_bufs = true, all_files = true;
  for (int w = 0; w < opts.num_workers; ++w) {
    auto worker = std::make_unique<UringWorker>(opts.queue_depth);
    bool fb = false, ff = false;
    int rc = worker->init(opts.max_buffers, opts.max_files, &fb, &ff, &b->setup_flags_);
    if (rc < 0) {
      if (why) *why = "io_uring_setup: " + errno_str(-rc);
      b->workers_.clear();
      return nullptr;
    }
    all_bufs &= fb;
    all_files &= ff;
    b->workers_.push_back(std::move(worker));
  }
  b->fixed_buffers_ = all_bufs;
  b->fixed_files_ = all_files;
  for (auto& w : b->workers_) w->start();
  return b;
}

UringBackend::~UringBackend() { shutdown(int64_t{10} * 1000000000); }

void UringBackend::submit(std::shared_ptr<Request> req, size_t begin, size_t end) {
  if (begin >= end) return;
  size_t n = end - begin;
  size_t nw = workers_.size();
  // Small batches stay on one worker (ordering, fewer wakeups); large ones are split in
  // contiguous ranges so every ring works on them.
  constexpr size_t kSplitMin = 256;
  if (nw == 1 || n < kSplitMin * 2) {
    workers_[rr_.fetch_add(1, std::memory_order_relaxed) % nw]->push(std::move(req), begin, end);
    return;
  }
  size_t parts = std::min(nw, n / kSplitMin);
  size_t base = rr_.fetch_add(1, std::memory_order_relaxed);
  for (size_t p = 0; p < parts; ++p) {
    size_t b = begin + n * p / parts, e = begin + n * (p + 1) / parts;
    workers_[(base + p) % nw]->push(req, b, e);
  }
}

void UringBackend::kick() noexcept {
  for (auto& w : workers_) w->kick();
}

int UringBackend::set_buffer(int slot, void* addr, size_t len) noexcept {
  if (!fixed_buffers_) return -EOPNOTSUPP;
  iovec iov{addr, len};
  for (size_t w = 0; w < workers_.size(); ++w) {
    int rc = io_uring_register_buffers_update_tag(workers_[w]->ring(), slot, &iov, nullptr, 1);
    if (rc < 0 || rc == 0) {
      for (size_t u = 0; u < w; ++u) clear_buffer_one(u, slot);
      return rc < 0 ? rc : -EIO;
    }
  }
  return 0;
}

void UringBackend::clear_buffer(int slot) noexcept {
  for (size_t w = 0; w < workers_.size(); ++w) clear_buffer_one(w, slot);
}

void UringBackend::clear_buffer_one(size_t w, int slot) noexcept {
  iovec iov{nullptr, 0};
  io_uring_register_buffers_update_tag(workers_[w]->ring(), slot, &iov, nullptr, 1);
}

int UringBackend::set_file(int slot, int fd) noexcept {
  if (!fixed_files_) return -EOPNOTSUPP;
  for (size_t w = 0; w < workers_.size(); ++w) {
    int rc = io_uring_register_files_update(workers_[w]->ring(), slot, &fd, 1);
    if (rc < 0 || rc == 0) {
      int none = -1;
      for (size_t u = 0; u < w; ++u) io_uring_register_files_update(workers_[u]->ring(), slot, &none, 1);
      return rc < 0 ? rc : -EIO;
    }
  }
  return 0;
}

void UringBackend::clear_file(int slot) noexcept {
  int none = -1;
  for (auto& w : workers_) io_uring_register_files_update(w->ring(), slot, &none, 1);
}

int64_t UringBackend::shutdown(int64_t timeout_ns) {
  if (shut_) return 0;
  shut_ = true;
  for (auto& w : workers_) w->stop();
  int64_t stuck = 0;
  // One deadline for all workers, not timeout_ns each.
  const int64_t start = now_ns();
  const int64_t until = timeout_ns > INT64_MAX - start ? INT64_MAX : start + timeout_ns;
  for (auto& w : workers_) stuck += w->join(std::max<int64_t>(0, until == INT64_MAX ? INT64_MAX : until - now_ns()));
  if (stuck) {
    // Leak the workers: their rings and slots keep every buffer the kernel may still write.
    for (auto& w : workers_) w.release();
  }
  workers_.clear();
  return stuck;
}

BackendStats UringBackend::stats() const noexcept {
  BackendStats s;
  for (auto& w : workers_) {
    s.entries_started += w->a_started.load();
    s.ops_submitted += w->a_ops.load();
    s.resubmits += w->a_resubmits.load();
    s.cancels_sent += w->a_cancels.load();
    s.fixed_buffer_ops += w->a_fixbuf.load();
    s.fixed_file_ops += w->a_fixfile.load();
    s.stale_completions += w->a_stale.load();
  }
  return s;
}

std::map<std::string, std::string> UringBackend::describe() const {
  return {{"workers", std::to_string(opts_.num_workers)},
          {"queue_depth", std::to_string(opts_.queue_depth)},
          {"setup_flags", setup_flags_},
          {"fixed_buffers", fixed_buffers_ ? "yes (" + std::to_string(opts_.max_buffers) + " slots)" : "no"},
          {"fixed_files", fixed_files_ ? "yes (" + std::to_string(opts_.max_files) + " slots)" : "no"}};
}

UringProbe probe_uring() {
  UringProbe p;
  FILE* f = fopen("/proc/sys/kernel/io_uring_disabled", "r");
  if (f) {
    int v = -1;
    if (fscanf(f, "%d", &v) == 1) p.facts["kernel.io_uring_disabled"] = std::to_string(v);
    fclose(f);
  } else {
    p.facts["kernel.io_uring_disabled"] = "absent (kernel < 6.6 or no sysctl)";
  }
#ifdef IO_URING_VERSION_MAJOR
  p.facts["liburing"] = std::to_string(IO_URING_VERSION_MAJOR) + "." + std::to_string(IO_URING_VERSION_MINOR);
#else
  p.facts["liburing"] = "< 2.4 (headers carry no version)";
#endif
  io_uring ring;
  int rc = io_uring_queue_init(8, &ring, 0);
  if (rc < 0) {
    p.reason = "io_uring_setup: " + errno_str(-rc);
    if (rc == -ENOSYS) p.reason += " - kernel without io_uring, or a seccomp profile returns ENOSYS";
    else if (rc == -EPERM) p.reason += " - disabled by kernel.io_uring_disabled or refused by seccomp/LSM";
    else if (rc == -ENOMEM) p.reason += " - RLIMIT_MEMLOCK too low for the ring";
    return p;
  }
  p.usable = true;
  p.reason = "ok";
  io_uring_probe* pr = io_uring_get_probe_ring(&ring);
  if (pr) {
    std::string ops, missing;
    struct { int op; const char* name; } want[] = {{IORING_OP_READ, "READ"}, {IORING_OP_WRITE, "WRITE"},
        {IORING_OP_READ_FIXED, "READ_FIXED"}, {IORING_OP_WRITE_FIXED, "WRITE_FIXED"},
        {IORING_OP_ASYNC_CANCEL, "ASYNC_CANCEL"}};
    for (auto& w : want) {
      if (!ops.empty()) ops += " ";
      bool have = io_uring_opcode_supported(pr, w.op);
      ops += std::string(w.name) + (have ? "" : "(missing)");
      if (!have) missing += std::string(missing.empty() ? "" : " ") + w.name;
    }
    if (!missing.empty()) {
      p.usable = false;
      p.reason = "kernel lacks io_uring opcodes: " + missing;
    }
    p.facts["opcodes"] = ops;
    io_uring_free_probe(pr);
  }
  p.facts["features"] = std::string((ring.features & IORING_FEAT_EXT_ARG) ? "EXT_ARG " : "") +
                        ((ring.features & IORING_FEAT_RSRC_TAGS) ? "RSRC_TAGS " : "") +
                        ((ring.features & IORING_FEAT_NODROP) ? "NODROP" : "");
  int sb = io_uring_register_buffers_sparse(&ring, 4);
  p.facts["sparse_registered_buffers"] = sb == 0 ? "yes" : "no: " + errno_str(-sb);
  io_uring_queue_exit(&ring);
  if (!(ring.features & IORING_FEAT_EXT_ARG)) {
    p.usable = false;
    p.reason = "kernel lacks IORING_FEAT_EXT_ARG (needs Linux >= 5.11)";
  }
  return p;
}

}  // namespace dpmove
