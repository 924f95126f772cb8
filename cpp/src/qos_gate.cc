#include "dpmove/qos_gate.h"

#include <algorithm>
#include <cerrno>
#include <climits>

#include "dpmove/request.h"
#include "dpmove/status.h"

namespace dpmove {
namespace qos {

namespace {
// A run of entries submitted as one operation holds at most this many entries, so one huge
// batch of tiny entries does not become one indivisible operation.
constexpr size_t kMaxRunEntries = 1024;
}  // namespace

Gate::Gate(std::string path, GateOptions opts) : path_(std::move(path)), opts_(std::move(opts)) {
  if (opts_.classes.empty()) throw UsageError("qos: at least one traffic class is needed");
  if (opts_.low_chunk_bytes && opts_.low_chunk_bytes % 4096)
    throw UsageError("qos: low_chunk_bytes must be a multiple of 4096 (O_DIRECT alignment), got " +
                     std::to_string(opts_.low_chunk_bytes));
  // The arbiter validates the classes whether or not QoS is on: a bad configuration is an
  // error in both modes.
  auto arb = std::make_unique<Arbiter>(opts_.classes, opts_.starvation_bound_ns, opts_.quantum_bytes);
  top_level_ = arb->top_level();
  if (opts_.enabled) arb_ = std::move(arb);
  size_t n = opts_.classes.size();
  inflight_.assign(n, 0);
  queued_bytes_.assign(n, 0);
  bytes_.assign(n, 0);
  ops_.assign(n, 0);
  if (opts_.enabled) thread_ = std::thread([this] { run(); });
}

Gate::~Gate() { close(); }

int Gate::find(const std::string& name) const {
  for (size_t i = 0; i < opts_.classes.size(); ++i)
    if (opts_.classes[i].name == name) return static_cast<int>(i);
  return -1;
}

int64_t Gate::max_op_bytes(int cls) const {
  if (!opts_.enabled || !opts_.low_chunk_bytes || top(cls)) return INT64_MAX;
  return static_cast<int64_t>(opts_.low_chunk_bytes);
}

void Gate::submit(const std::shared_ptr<Request>& req, int cls, std::shared_ptr<Sink> sink,
                  std::shared_ptr<void> payload, bool whole) {
  if (cls < 0 || static_cast<size_t>(cls) >= opts_.classes.size())
    throw UsageError("qos: traffic class index " + std::to_string(cls) + " out of range");
  req->qos_attach(shared_from_this(), cls, max_op_bytes(cls));
  const size_t n = req->size();
  // Runs of consecutive entries: whole, or cut once a run reaches the quantum (so DRR and the
  // windows work at about quantum granularity) or kMaxRunEntries.
  std::vector<Item> items;
  for (size_t b = 0; b < n;) {
    Item it;
    it.req = req;
    it.sink = sink;
    it.payload = payload;
    it.cls = cls;
    it.begin = static_cast<uint32_t>(b);
    size_t e = b;
    uint64_t bytes = 0;
    // QoS off dispatches everything at once: one run, as dispatch_all would merge it anyway.
    while (e < n && (whole || !arb_ || e == b || (bytes < opts_.quantum_bytes && e - b < kMaxRunEntries)))
      bytes += static_cast<uint64_t>(req->entry(e++).length);
    it.end = static_cast<uint32_t>(e);
    it.bytes = bytes;
    items.push_back(std::move(it));
    b = e;
  }
  if (n == 0) {  // nothing to arbitrate (a bare notification): straight through
    Item it;
    it.req = req;
    it.sink = std::move(sink);
    it.payload = std::move(payload);
    it.cls = cls;
    items.push_back(std::move(it));
  }
  std::vector<Item> go, drop;
  bool refused = false;
  std::unique_lock<std::mutex> order(dispatch_mu_, std::defer_lock);
  if (arb_) order.lock();  // FIFO dispatches on the caller's thread only: arrival order holds
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (closed_) {
      refused = true;
    } else if (!arb_) {
      go = std::move(items);  // FIFO: everything goes now, in arrival order
      for (auto& it : go) {
        inflight_[static_cast<size_t>(cls)] += it.bytes;
        inflight_total_ += it.bytes;
        if (!top(cls)) inflight_low_ += it.bytes;
        bytes_[static_cast<size_t>(cls)] += it.bytes;
        ++ops_[static_cast<size_t>(cls)];
      }
    } else {
      int64_t now = now_ns();
      if (top(cls)) top_seen_ns_.store(now, std::memory_order_relaxed);
      const size_t nruns = items.size();
      for (auto& it : items) {
        uint32_t id;
        if (!free_.empty()) {
          id = free_.back();
          free_.pop_back();
        } else {
          id = static_cast<uint32_t>(slab_.size());
          slab_.emplace_back();
        }
        queued_bytes_[static_cast<size_t>(cls)] += it.bytes;
        arb_->enqueue(cls, id, it.bytes, now);
        slab_[id] = std::move(it);
      }
      pump_locked(now, &go, &drop);
      // What stays queued waits for tokens or a window: the gate's thread must (re)compute
      // when to look again.
      if (arb_->queued()) cv_.notify_one();
      // Only a request that still waits here needs the gate to apply its deadline: some of
      // its runs neither went out nor were dropped.
      auto mine = [&](const std::vector<Item>& v) {
        return static_cast<size_t>(std::count_if(v.begin(), v.end(), [&](const Item& x) { return x.req == req; }));
      };
      if (req->deadline_ns() != INT64_MAX && mine(go) + mine(drop) < nruns) deadlines_.push({req->deadline_ns(), req});
    }
  }
  if (refused) {
    req->cancel();
    return;
  }
  dispatch_all(go);
}

void Gate::pump_locked(int64_t now, std::vector<Item>* out, std::vector<Item>* drop) {
  pump_ = false;
  if (!arb_) return;
  Grant g;
  for (;;) {
    if (opts_.inflight_bytes && inflight_total_ >= opts_.inflight_bytes) break;
    int min_level = (top_active(now) && opts_.low_inflight_bytes && inflight_low_ >= opts_.low_inflight_bytes) ? top_level_
                                                                                                         : INT_MIN;
    if (!arb_->dequeue(now, &g, min_level)) break;
    Item it = std::move(slab_[g.op]);
    slab_[g.op] = Item();
    free_.push_back(static_cast<uint32_t>(g.op));
    size_t c = static_cast<size_t>(it.cls);
    queued_bytes_[c] -= it.bytes;
    // A request that ended while queued had its entries swept; nothing of it goes out. (Its
    // bytes were taken from the class's token bucket all the same.)
    if (it.req->terminal() && it.begin != it.end) {
      drop->push_back(std::move(it));
      continue;
    }
    inflight_[c] += it.bytes;
    inflight_total_ += it.bytes;
    if (opts_.classes[c].level != top_level_) inflight_low_ += it.bytes;
    sync_top_locked();
    bytes_[c] += it.bytes;
    ++ops_[c];
    out->push_back(std::move(it));
  }
}

void Gate::dispatch_all(std::vector<Item>& items) {
  // Consecutive runs of one request bound for one sink go out as one range (a backend batches
  // better with one range than with many small ones).
  for (size_t i = 0; i < items.size();) {
    Item& a = items[i];
    size_t j = i + 1;
    uint32_t end = a.end;
    while (j < items.size() && items[j].req == a.req && items[j].sink == a.sink && items[j].begin == end)
      end = items[j++].end;
    uint64_t ended = a.req->qos_dispatched(a.begin, end);
    if (ended) release(a.cls, ended);
    a.sink->dispatch(a.req, a.begin, end, a.payload);
    i = j;
  }
  items.clear();
}

void Gate::release(int cls, uint64_t bytes) noexcept {
  std::lock_guard<std::mutex> lk(mu_);
  size_t c = static_cast<size_t>(cls);
  uint64_t b = std::min(bytes, inflight_[c]);
  inflight_[c] -= b;
  inflight_total_ -= std::min(b, inflight_total_);
  if (opts_.classes[c].level != top_level_) inflight_low_ -= std::min(b, inflight_low_);
  else top_seen_ns_.store(now_ns(), std::memory_order_relaxed);
  sync_top_locked();
  if (arb_ && arb_->queued() && !pump_) {
    pump_ = true;
    cv_.notify_one();
  }
}

void Gate::purge(const Request* req, int cls) noexcept {
  std::vector<Item> gone;  // destroyed outside mu_: the last reference to a request may go here
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!arb_ || closed_) return;
    arb_->remove_if(cls, now_ns(), [&](uint64_t id) {
      Item& it = slab_[id];
      if (it.req.get() != req) return false;
      queued_bytes_[static_cast<size_t>(cls)] -= it.bytes;
      gone.push_back(std::move(it));
      it = Item();
      free_.push_back(static_cast<uint32_t>(id));
      return true;
    });
  }
}

void Gate::prune_deadlines_locked() {
  // The heap holds requests that were queued at some point; most leave the queue long before
  // their deadline. Rebuilt when it outgrows what is queued, keeping requests still queued.
  if (deadlines_.size() < 4096 || deadlines_.size() < 4 * (arb_->queued() + 1)) return;
  std::vector<const Request*> live;
  for (auto& it : slab_)
    if (it.req) live.push_back(it.req.get());
  std::sort(live.begin(), live.end());
  decltype(deadlines_) kept;
  for (; !deadlines_.empty(); deadlines_.pop()) {
    auto r = deadlines_.top().second.lock();
    if (r && std::binary_search(live.begin(), live.end(), r.get())) kept.push(deadlines_.top());
  }
  deadlines_.swap(kept);
}

void Gate::run() {
  std::vector<Item> go, drop;
  std::unique_lock<std::mutex> lk(mu_);
  while (!stop_) {
    int64_t now = now_ns();
    // Deadlines of queued requests: a request that waits in the gate past its deadline ends
    // TIMED_OUT even when nobody is waiting on it.
    std::vector<std::shared_ptr<Request>> due;
    while (!deadlines_.empty() && deadlines_.top().first <= now) {
      if (auto r = deadlines_.top().second.lock()) due.push_back(std::move(r));
      deadlines_.pop();
    }
    if (!due.empty()) {
      lk.unlock();
      for (auto& r : due) r->poll();  // may sweep, which calls release(): not under mu_
      due.clear();
      lk.lock();
      continue;
    }
    if (pump_) {
      lk.unlock();  // dispatch_mu_ comes before mu_
      {
        std::lock_guard<std::mutex> order(dispatch_mu_);
        {
          std::lock_guard<std::mutex> l2(mu_);
          pump_locked(now_ns(), &go, &drop);
        }
        dispatch_all(go);
      }
      drop.clear();
      lk.lock();
      prune_deadlines_locked();
      continue;
    }
    int64_t wake = arb_->queued() ? arb_->next_eligible(now) : INT64_MAX;
    if (!deadlines_.empty()) wake = std::min(wake, deadlines_.top().first);
    if (wake == INT64_MAX) {
      cv_.wait(lk);
    } else if (wake > now) {
      // Sliced: a wait_for of years overflows inside libstdc++.
      if (cv_.wait_for(lk, std::chrono::nanoseconds(std::min<int64_t>(wake - now, 1'000'000'000))) ==
          std::cv_status::timeout)
        pump_ = true;
    } else {
      pump_ = true;
    }
  }
}

void Gate::close() {
  std::vector<Item> left;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (closed_) return;
    closed_ = stop_ = true;
    for (auto& it : slab_)
      if (it.req) left.push_back(std::move(it));
    slab_.clear();
    free_.clear();
    if (arb_) {
      int64_t now = now_ns();
      for (size_t c = 0; c < opts_.classes.size(); ++c) arb_->remove_if(static_cast<int>(c), now, [](uint64_t) { return true; });
    }
    std::fill(queued_bytes_.begin(), queued_bytes_.end(), 0);
    while (!deadlines_.empty()) deadlines_.pop();
    cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
  // Queued requests never reached their backend: they end cancelled.
  for (auto& it : left) it.req->cancel();
}

GateClassStats Gate::stats(int cls) const {
  std::lock_guard<std::mutex> lk(mu_);
  size_t c = static_cast<size_t>(cls);
  if (c >= opts_.classes.size()) throw UsageError("qos: traffic class index " + std::to_string(cls) + " out of range");
  GateClassStats s;
  if (arb_) s.arb = arb_->stats(cls);
  s.bytes = bytes_[c];
  s.ops = ops_[c];
  s.inflight_bytes = inflight_[c];
  s.queued_bytes = queued_bytes_[c];
  return s;
}

uint64_t Gate::inflight_bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return inflight_total_;
}

}  // namespace qos
}  // namespace dpmove
