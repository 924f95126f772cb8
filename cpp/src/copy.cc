#include "dpmove/copy.h"

#include <cerrno>
#include <condition_variable>
#include <deque>
#include <thread>

#include "dpmove/batched_copy.h"
#include "dpmove/region.h"
#include "dpmove/status.h"

namespace dpmove {
namespace copy {

const char* kind_name(Kind k) noexcept { return k == Kind::kBatched ? "batched" : "cuda"; }

namespace {
// Completion polling: spin on event_query this long, then sleep between queries, doubling up
// to kMaxSleepNs. Copies of a Layer Block take microseconds; sleeping at once would add a
// scheduler wake-up (50+ us) to every completion.
constexpr int64_t kSpinNs = 50000;
constexpr int64_t kMinSleepNs = 2000, kMaxSleepNs = 200000;
}  // namespace

struct Copier::Lane {
  int dev = 0;
  bool d2h = false;
  void* stream = nullptr;
  struct Pending {
    void* ev;
    std::shared_ptr<Request> req;
    std::vector<uint32_t> idx;  // entries this event completes
    std::vector<Table> tables;  // descriptor tables to give back (batched)
  };
  std::mutex mu;  // q, events; held across a run's driver calls so events complete in queue order
  std::condition_variable cv;
  std::deque<Pending> q;
  std::vector<void*> events;  // free
  bool stop = false;
  int64_t stop_deadline = INT64_MAX;
  int64_t leaked = 0;  // entries still queued when shutdown's deadline passed
  bool orphan = false;  // set then: the thread is detached and runs until the queue drains
  std::thread th;
};

Copier::Copier(gpu::GpuApi& api, Kind kind) : api_(api), kind_(kind) {}

Copier::~Copier() { shutdown(0); }

Copier::Lane& Copier::lane(int dev, bool d2h) {
  std::lock_guard<std::mutex> lk(mu_);
  if (stopping_) throw ClosedError("copy backend is shut down");
  auto key = std::make_pair(dev, d2h ? 1 : 0);
  auto& v = lanes_[key];
  unsigned i = next_lane_[key]++ % kStreamsPerDir;
  if (i >= v.size()) {
    auto l = std::make_unique<Lane>();
    l->dev = dev;
    l->d2h = d2h;
    if (int rc = api_.stream_create(dev, &l->stream))
      throw SysError(EIO, std::string(kind_name(kind_)) + " copies: cuStreamCreate on device " + std::to_string(dev) +
                              ": " + api_.error_string(rc));
    Lane* lp = l.get();
    auto self = shared_from_this();  // an orphaned completion thread outlives shutdown()
    l->th = std::thread([self, lp] { self->complete(*lp); });
    v.push_back(std::move(l));
    i = static_cast<unsigned>(v.size() - 1);
  }
  return *v[i];
}

Copier::Table Copier::take_table() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!tables_.empty()) {
      Table t = tables_.back();
      tables_.pop_back();
      return t;
    }
  }
  Table t{};
  if (int rc = api_.host_alloc(kDescsPerTable * sizeof(gpu::CopyDesc), &t.host, &t.alias))
    throw SysError(ENOMEM, "batched copies: cuMemHostAlloc of a descriptor table: " + api_.error_string(rc));
  std::lock_guard<std::mutex> lk(mu_);
  all_tables_.push_back(t);
  std::lock_guard<std::mutex> sk(stats_mu_);
  ++stats_.desc_tables;
  return t;
}

void Copier::give_table(Table t) {
  std::lock_guard<std::mutex> lk(mu_);
  tables_.push_back(t);
}

void Copier::submit(const std::shared_ptr<Request>& req, size_t begin, size_t end) {
  const int64_t t0 = now_ns();
  const bool d2h = req->op() == OpKind::kD2H;
  const Region& dreg = *req->device();
  const Region& hreg = *req->region();
  const Memory& hmem = *hreg.memory();
  const int dev = dreg.memory()->device();
  const gpu::DevPtr dbase = reinterpret_cast<gpu::DevPtr>(dreg.data());
  uint8_t* hbase = hreg.data();
  // Device-side address of host byte 0 of the region (batched: the kernel dereferences it).
  const gpu::DevPtr halias = hmem.device_alias() + hreg.offset_in_memory();

  Lane* lp;
  try {
    lp = &lane(dev, d2h);
  } catch (const std::exception& e) {
    req->set_detail(e.what());
    for (size_t i = begin; i < end; ++i)
      if (req->start(i)) req->finish(i, -EIO, 0);
    return;
  }
  Lane& l = *lp;
  uint64_t copies = 0, launches = 0, errors = 0, pageable = 0;
  {
    std::lock_guard<std::mutex> lk(l.mu);
    if (int rc = api_.enter(dev)) {
      req->set_detail(std::string(kind_name(kind_)) + " copies: cuCtxSetCurrent: " + api_.error_string(rc));
      for (size_t i = begin; i < end; ++i)
        if (req->start(i)) req->finish(i, -EIO, 0);
      return;
    }
    Lane::Pending p{nullptr, req, {}, {}};
    p.idx.reserve(end - begin);
    auto fail = [&](size_t i, int rc, const char* what) {
      req->set_detail(std::string(kind_name(kind_)) + " copies: " + what + ": " + api_.error_string(rc));
      req->finish(i, -EIO, 0);
      ++errors;
    };
    if (kind_ == Kind::kCuda) {
      for (size_t i = begin; i < end; ++i) {
        if (!req->start(i)) continue;
        req->set_start_time(i, t0);
        const IoEntry& e = req->entry(i);
        const gpu::DevPtr d = dbase + static_cast<uint64_t>(e.file_offset);
        uint8_t* h = hbase + e.region_offset;
        int rc = d2h ? api_.memcpy_d2h(h, d, static_cast<size_t>(e.length), l.stream)
                     : api_.memcpy_h2d(d, h, static_cast<size_t>(e.length), l.stream);
        if (rc) {
          fail(i, rc, d2h ? "cuMemcpyDtoHAsync" : "cuMemcpyHtoDAsync");
          continue;
        }
        p.idx.push_back(static_cast<uint32_t>(i));
        ++copies;
      }
      if (!hmem.pinned()) pageable += copies;
    } else {
      size_t i = begin;
      while (i < end) {
        Table t;
        try {
          t = take_table();
        } catch (const std::exception& ex) {
          req->set_detail(ex.what());
          for (; i < end; ++i)
            if (req->start(i)) req->finish(i, -ENOMEM, 0), ++errors;
          break;
        }
        auto* descs = static_cast<gpu::CopyDesc*>(t.host);
        uint32_t n = 0;
        uint64_t max_len = 0;
        const size_t first = p.idx.size();
        for (; i < end && n < kDescsPerTable; ++i) {
          if (!req->start(i)) continue;
          req->set_start_time(i, t0);
          const IoEntry& e = req->entry(i);
          const gpu::DevPtr d = dbase + static_cast<uint64_t>(e.file_offset);
          const gpu::DevPtr h = halias + static_cast<uint64_t>(e.region_offset);
          descs[n] = gpu::CopyDesc{d2h ? h : d, d2h ? d : h, static_cast<unsigned long long>(e.length)};
          if (static_cast<uint64_t>(e.length) > max_len) max_len = static_cast<uint64_t>(e.length);
          ++n;
          p.idx.push_back(static_cast<uint32_t>(i));
        }
        if (n == 0) {
          give_table(t);
          continue;
        }
        if (int rc = api_.launch_batched(dev, t.alias, n, max_len, l.stream)) {
          for (size_t k = first; k < p.idx.size(); ++k) fail(p.idx[k], rc, "cuLaunchKernel(dpmove_batched_copy)");
          p.idx.resize(first);
          give_table(t);
          continue;
        }
        p.tables.push_back(t);
        copies += n;
        ++launches;
      }
    }
    if (!p.idx.empty()) {
      int rc = 0;
      if (l.events.empty()) {
        void* ev = nullptr;
        rc = api_.event_create(dev, &ev);
        if (rc == 0) l.events.push_back(ev);
      }
      if (rc == 0) {
        p.ev = l.events.back();
        rc = api_.event_record(p.ev, l.stream);
        if (rc == 0) l.events.pop_back();
      }
      if (rc) {
        // Without an event nothing would tell us when these copies end: wait for the stream
        // here (they are queued and cannot be recalled), then fail them, so a failed entry
        // never has a copy still touching its buffers.
        api_.stream_sync(l.stream);
        for (uint32_t k : p.idx) fail(k, rc, "cuEventRecord");
        p.idx.clear();
      } else {
        l.q.push_back(std::move(p));
      }
    }
    if (!p.tables.empty() && p.idx.empty())
      for (auto& t : p.tables) give_table(t);
  }
  l.cv.notify_one();
  std::lock_guard<std::mutex> sk(stats_mu_);
  ++stats_.runs;
  stats_.copies += copies;
  stats_.launches += launches;
  stats_.errors += errors;
  stats_.pageable += pageable;
  stats_.submit_ns += static_cast<uint64_t>(now_ns() - t0);
}

void Copier::complete(Lane& l) {
  for (;;) {
    Lane::Pending* p;
    {
      std::unique_lock<std::mutex> lk(l.mu);
      l.cv.wait(lk, [&] { return l.stop || !l.q.empty(); });
      if (l.q.empty()) return;
      p = &l.q.front();  // deque: references stay valid while others push_back
    }
    int rc;
    const int64_t t0 = now_ns();
    int64_t sleep_ns = kMinSleepNs;
    for (;;) {
      rc = api_.event_query(p->ev);
      if (rc != gpu::kNotReady) break;
      int64_t now = now_ns();
      if (now - t0 < kSpinNs) {
        std::this_thread::yield();
        continue;
      }
      {
        std::lock_guard<std::mutex> lk(l.mu);
        if (l.stop && now >= l.stop_deadline && !l.orphan) {
          for (auto& q : l.q) l.leaked += static_cast<int64_t>(q.idx.size());
          l.orphan = true;
          l.cv.notify_all();  // shutdown() stops waiting for this lane
        }
      }
      std::this_thread::sleep_for(std::chrono::nanoseconds(sleep_ns));
      sleep_ns = std::min(sleep_ns * 2, kMaxSleepNs);
    }
    uint64_t bytes = 0, errors = 0;
    if (rc) {
      p->req->set_detail(std::string(kind_name(kind_)) + " copies: device reported " + api_.error_string(rc));
      for (uint32_t i : p->idx) p->req->finish(i, -EIO, 0);
      errors = p->idx.size();
    } else {
      for (uint32_t i : p->idx) {
        const int64_t len = p->req->entry(i).length;
        p->req->finish(i, 0, len);
        bytes += static_cast<uint64_t>(len);
      }
    }
    std::vector<Table> tables;
    {
      std::lock_guard<std::mutex> lk(l.mu);
      l.events.push_back(p->ev);
      tables.swap(p->tables);
      l.q.pop_front();
      l.cv.notify_all();
    }
    for (auto& t : tables) give_table(t);
    std::lock_guard<std::mutex> sk(stats_mu_);
    stats_.bytes += bytes;
    stats_.errors += errors;
  }
}

int64_t Copier::shutdown(int64_t timeout_ns) {
  std::map<std::pair<int, int>, std::vector<std::unique_ptr<Lane>>> lanes;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_) return 0;
    stopping_ = true;
    lanes.swap(lanes_);
  }
  const int64_t deadline = timeout_ns >= INT64_MAX - now_ns() ? INT64_MAX : now_ns() + timeout_ns;
  for (auto& kv : lanes)
    for (auto& l : kv.second) {
      {
        std::lock_guard<std::mutex> lk(l->mu);
        l->stop = true;
        l->stop_deadline = deadline;
      }
      l->cv.notify_all();
    }
  int64_t leaked = 0;
  for (auto& kv : lanes)
    for (auto& l : kv.second) {
      {
        std::unique_lock<std::mutex> lk(l->mu);
        l->cv.wait(lk, [&] { return l->q.empty() || l->orphan; });
        if (l->orphan) {
          leaked += l->leaked;
          lk.unlock();
          l->th.detach();
          l.release();  // the device may still run these copies: keep stream, events, tables
          continue;
        }
      }
      l->th.join();
      for (void* ev : l->events) api_.event_destroy(l->dev, ev);
      api_.stream_destroy(l->dev, l->stream);
    }
  if (!leaked) {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& t : all_tables_) api_.host_free(t.host);
    all_tables_.clear();
    tables_.clear();
  }
  return leaked;
}

Stats Copier::stats() const {
  std::lock_guard<std::mutex> sk(stats_mu_);
  return stats_;
}

}  // namespace copy
}  // namespace dpmove
