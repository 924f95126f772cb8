#include "dpmove/request.h"

#include <time.h>

#include <cerrno>
#include <climits>

#include "dpmove/file.h"
#include "dpmove/qos_gate.h"
#include "dpmove/region.h"
#include "dpmove/status.h"

namespace dpmove {

const char* state_name(ReqState s) noexcept {
  switch (s) {
    case ReqState::kPending: return "pending";
    case ReqState::kDone: return "done";
    case ReqState::kFailed: return "failed";
    case ReqState::kTimedOut: return "timed_out";
    case ReqState::kCancelled: return "cancelled";
  }
  return "?";
}

const char* op_name(OpKind op) noexcept {
  switch (op) {
    case OpKind::kRead: return "read";
    case OpKind::kWrite: return "write";
    case OpKind::kPut: return "put";
    case OpKind::kH2D: return "h2d";
    case OpKind::kD2H: return "d2h";
  }
  return "?";
}

int64_t now_ns() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

Request::Request(uint64_t id, OpKind op, std::shared_ptr<File> file, std::shared_ptr<Region> region,
                 std::vector<IoEntry> entries, int64_t deadline_ns, bool timing, std::string target,
                 std::shared_ptr<Region> device)
    : id_(id), op_(op), file_(std::move(file)), region_(std::move(region)), device_(std::move(device)),
      entries_(std::move(entries)),
      target_(!target.empty() ? std::move(target) : file_ ? file_->path() : std::string()),
      deadline_ns_(deadline_ns), timing_(timing), unfinished_(static_cast<int64_t>(entries_.size())) {
  size_t n = entries_.size();
  status_.reset(new std::atomic<int32_t>[n]);
  bytes_.reset(new int64_t[n]());
  for (size_t i = 0; i < n; ++i) status_[i].store(kEntryPending, std::memory_order_relaxed);
  if (timing_) {
    t_start_.reset(new int64_t[n]);
    t_end_.reset(new int64_t[n]);
    for (size_t i = 0; i < n; ++i) t_start_[i] = t_end_[i] = -1;
  }
  if (n == 0) state_.store(static_cast<int>(ReqState::kDone));
}

bool Request::start(size_t i) noexcept {
  // No entry starts once the request is terminal, even before the sweep (which runs after the
  // state flips) reaches it. An entry that does start holds unfinished_ above 0 until it
  // finishes, so quiesced() cannot be true while it runs. running_ goes up before the state is
  // read (all seq_cst) so in_flight never misses an entry about to be handed to the kernel.
  running_.fetch_add(1, std::memory_order_seq_cst);
  int32_t expect = kEntryPending;
  if (state_.load(std::memory_order_seq_cst) == static_cast<int>(ReqState::kPending) &&
      status_[i].compare_exchange_strong(expect, kEntryRunning, std::memory_order_seq_cst))
    return true;
  if (running_.fetch_sub(1, std::memory_order_seq_cst) == 1 && terminal()) notify();
  return false;
}

bool Request::finish(size_t i, int32_t status, int64_t bytes) noexcept {
  // Only the thread that won start(i) finishes entry i, so t_end_ and bytes_ have a single
  // writer; they are written before the status release that publishes them.
  if (timing_) t_end_[i] = now_ns();
  int32_t cur = status_[i].load(std::memory_order_acquire);
  if (cur != kEntryRunning) {
    duplicates_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  bytes_[i] = bytes;
  if (!status_[i].compare_exchange_strong(cur, status, std::memory_order_acq_rel)) {
    duplicates_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  bytes_done_.fetch_add(bytes, std::memory_order_relaxed);
  if (status != kEntryOk) failed_.fetch_add(1, std::memory_order_relaxed);
  // Before the terminal notify: a waiter that wakes sees the gate's window already freed.
  if (gate_) qos_ended(i);
  bool last_running = running_.fetch_sub(1, std::memory_order_seq_cst) == 1;
  bool last_entry = unfinished_.fetch_sub(1, std::memory_order_acq_rel) == 1;
  if (last_entry) set_terminal(failed_.load(std::memory_order_acquire) ? ReqState::kFailed : ReqState::kDone);
  if (last_entry || (last_running && terminal())) notify();
  return true;
}

bool Request::set_terminal(ReqState s) noexcept {
  int expect = static_cast<int>(ReqState::kPending);
  return state_.compare_exchange_strong(expect, static_cast<int>(s), std::memory_order_seq_cst);
}

void Request::sweep(int32_t status) noexcept {
  int64_t swept = 0;
  uint64_t freed = 0;
  for (size_t i = 0; i < entries_.size(); ++i) {
    int32_t expect = kEntryPending;
    if (status_[i].compare_exchange_strong(expect, status, std::memory_order_acq_rel)) {
      ++swept;
      if (gate_ && (qos_flags_[i].fetch_or(2, std::memory_order_acq_rel) & 1))
        freed += static_cast<uint64_t>(entries_[i].length);
    }
  }
  if (freed) gate_->release(qos_cls_, freed);
  if (gate_ && swept) gate_->purge(this, qos_cls_);
  if (swept) {
    failed_.fetch_add(swept, std::memory_order_relaxed);
    unfinished_.fetch_sub(swept, std::memory_order_acq_rel);
  }
  notify();
}

ReqState Request::poll() noexcept {
  ReqState s = state();
  if (s == ReqState::kPending && deadline_ns_ != INT64_MAX && now_ns() >= deadline_ns_) {
    // sweep() notifies, after the never-started entries have their final status.
    if (set_terminal(ReqState::kTimedOut)) sweep(-ETIMEDOUT);
    s = state();
  }
  return s;
}

void Request::qos_attach(std::shared_ptr<qos::Gate> gate, int cls, int64_t max_op_bytes) {
  qos_flags_.reset(new std::atomic<uint8_t>[entries_.size()]);
  for (size_t i = 0; i < entries_.size(); ++i) qos_flags_[i].store(0, std::memory_order_relaxed);
  gate_ = std::move(gate);
  qos_cls_ = cls;
  max_op_bytes_ = max_op_bytes > 0 ? max_op_bytes : INT64_MAX;
}

int64_t Request::max_op_bytes() const noexcept {
  if (max_op_bytes_ == INT64_MAX || gate_->top_active(now_ns())) return max_op_bytes_;
  return INT64_MAX;
}

void Request::qos_ended(size_t i) noexcept {
  if (qos_flags_[i].fetch_or(2, std::memory_order_acq_rel) & 1)
    gate_->release(qos_cls_, static_cast<uint64_t>(entries_[i].length));
}

uint64_t Request::qos_dispatched(size_t begin, size_t end) noexcept {
  uint64_t ended = 0;
  for (size_t i = begin; i < end; ++i)
    if (qos_flags_[i].fetch_or(1, std::memory_order_acq_rel) & 2) ended += static_cast<uint64_t>(entries_[i].length);
  return ended;
}

bool Request::cancel() noexcept {
  if (!set_terminal(ReqState::kCancelled)) return false;
  sweep(-ECANCELED);
  if (kick_) kick_();
  return true;
}

void Request::notify() noexcept {
  std::lock_guard<std::mutex> lk(mu_);
  cv_.notify_all();
}

namespace {
// Waits on cv until pred() or `until` (absolute monotonic ns), waking at `deadline` to apply it.
template <class Pred, class OnDeadline>
bool wait_until(std::mutex& mu, std::condition_variable& cv, int64_t until, int64_t deadline, Pred pred,
                OnDeadline on_deadline) {
  std::unique_lock<std::mutex> lk(mu);
  for (;;) {
    if (pred()) return true;
    int64_t now = now_ns();
    if (now >= deadline) {
      lk.unlock();
      on_deadline();
      lk.lock();
      if (pred()) return true;
      deadline = INT64_MAX;
    }
    if (now >= until) return false;
    int64_t wake = std::min(until, deadline);
    // Re-check at least every 100 ms as a guard against a lost wakeup.
    wake = std::min(wake, now + 100'000'000);
    cv.wait_for(lk, std::chrono::nanoseconds(wake - now));
  }
}
int64_t add_sat(int64_t a, int64_t b) { return (b < 0 || a > INT64_MAX - b) ? INT64_MAX : a + b; }
}  // namespace

bool Request::wait(int64_t timeout_ns) noexcept {
  int64_t until = add_sat(now_ns(), timeout_ns);
  return wait_until(mu_, cv_, until, deadline_ns_, [this] { return terminal(); }, [this] { poll(); });
}

bool Request::wait_quiesced(int64_t timeout_ns) noexcept {
  int64_t until = add_sat(now_ns(), timeout_ns);
  return wait_until(mu_, cv_, until, deadline_ns_, [this] { return quiesced(); }, [this] { poll(); });
}

void Request::copy_status(int32_t* out) const noexcept {
  for (size_t i = 0; i < entries_.size(); ++i) out[i] = status_[i].load(std::memory_order_acquire);
}

void Request::copy_bytes(int64_t* out) const noexcept {
  for (size_t i = 0; i < entries_.size(); ++i) {
    int32_t s = status_[i].load(std::memory_order_acquire);
    out[i] = (s == kEntryPending || s == kEntryRunning) ? 0 : bytes_[i];
  }
}

void Request::copy_latency(int64_t* out) const noexcept {
  for (size_t i = 0; i < entries_.size(); ++i) {
    int32_t s = status_[i].load(std::memory_order_acquire);
    bool done = s != kEntryPending && s != kEntryRunning;
    out[i] = (timing_ && done && t_start_[i] >= 0 && t_end_[i] >= 0) ? t_end_[i] - t_start_[i] : -1;
  }
}

void Request::set_detail(const std::string& d) {
  std::lock_guard<std::mutex> lk(mu_);
  if (detail_.empty()) detail_ = d;
}

std::string Request::detail() const {
  std::lock_guard<std::mutex> lk(mu_);
  return detail_;
}

std::pair<int64_t, int32_t> Request::first_failure() const noexcept {
  for (size_t i = 0; i < entries_.size(); ++i) {
    int32_t s = status_[i].load(std::memory_order_acquire);
    if (s != kEntryOk && s != kEntryPending && s != kEntryRunning) return {static_cast<int64_t>(i), s};
  }
  return {-1, 0};
}

}  // namespace dpmove
