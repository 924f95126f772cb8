#include "dpmove/qos.h"

#include <algorithm>
#include <climits>
#include <cmath>

#include "dpmove/status.h"

namespace dpmove {
namespace qos {

namespace {
// Wait-time histogram: 8 linear sub-buckets per power of two of nanoseconds (~12 % wide).
constexpr int kSub = 8;
constexpr int kBuckets = 64 * kSub;

int bucket_of(int64_t ns) {
  if (ns < kSub) return static_cast<int>(std::max<int64_t>(ns, 0));
  int e = 63 - __builtin_clzll(static_cast<uint64_t>(ns));  // ns in [2^e, 2^(e+1))
  int sub = static_cast<int>((static_cast<uint64_t>(ns) >> (e - 3)) & (kSub - 1));
  return std::min((e - 2) * kSub + sub, kBuckets - 1);
}

int64_t bucket_low(int b) {
  if (b < kSub) return b;
  int e = b / kSub + 2, sub = b % kSub;
  return (int64_t{1} << e) + (static_cast<int64_t>(sub) << (e - 3));
}

int64_t quantile(const std::vector<uint32_t>& h, double q) {
  uint64_t total = 0;
  for (uint32_t x : h) total += x;
  if (!total) return 0;
  uint64_t rank = static_cast<uint64_t>(std::ceil(q * static_cast<double>(total)));
  uint64_t acc = 0;
  for (int b = 0; b < kBuckets; ++b) {
    acc += h[static_cast<size_t>(b)];
    if (acc >= rank) return bucket_low(b);
  }
  return bucket_low(kBuckets - 1);
}
}  // namespace

Arbiter::Arbiter(std::vector<ClassConfig> classes, int64_t starvation_bound_ns, uint64_t quantum_bytes)
    : bound_ns_(starvation_bound_ns), quantum_(quantum_bytes) {
  if (classes.empty()) throw UsageError("qos: at least one traffic class is needed");
  if (starvation_bound_ns <= 0) throw UsageError("qos: starvation bound must be > 0 ns");
  if (quantum_bytes == 0) throw UsageError("qos: quantum must be > 0 bytes");
  for (auto& c : classes) {
    if (c.name.empty()) throw UsageError("qos: a traffic class needs a name");
    if (c.weight == 0) throw UsageError("qos: class '" + c.name + "' has weight 0; weights are >= 1");
    if (!(c.rate_bps >= 0) || std::isinf(c.rate_bps)) throw UsageError("qos: class '" + c.name + "' has a bad rate");
    for (auto& o : cls_)
      if (o.cfg.name == c.name) throw UsageError("qos: class '" + c.name + "' is declared twice");
    Class k;
    k.cfg = c;
    k.burst = c.rate_bps > 0 ? (c.burst_bytes ? c.burst_bytes : static_cast<uint64_t>(c.rate_bps)) : 0;
    k.tokens = static_cast<double>(k.burst);  // a limited class starts with a full bucket
    k.wait_hist.assign(kBuckets, 0);
    cls_.push_back(std::move(k));
  }
  for (auto& c : cls_) levels_.push_back(c.cfg.level);
  std::sort(levels_.begin(), levels_.end(), std::greater<int>());
  levels_.erase(std::unique(levels_.begin(), levels_.end()), levels_.end());
  by_level_.resize(levels_.size());
  for (size_t i = 0; i < cls_.size(); ++i) {
    size_t li = static_cast<size_t>(std::find(levels_.begin(), levels_.end(), cls_[i].cfg.level) - levels_.begin());
    by_level_[li].push_back(static_cast<int>(i));
  }
  rr_.assign(levels_.size(), 0);
  fresh_.assign(levels_.size(), true);
}

int Arbiter::find(const std::string& name) const {
  for (size_t i = 0; i < cls_.size(); ++i)
    if (cls_[i].cfg.name == name) return static_cast<int>(i);
  return -1;
}

void Arbiter::enqueue(int ci, uint64_t op, uint64_t bytes, int64_t now) {
  if (ci < 0 || static_cast<size_t>(ci) >= cls_.size())
    throw UsageError("qos: traffic class index " + std::to_string(ci) + " out of range");
  Class& c = cls_[static_cast<size_t>(ci)];
  c.q.push_back({op, bytes, now});
  ++c.st.queued;
  ++total_queued_;
}

void Arbiter::refill(Class& c, int64_t now) {
  if (c.cfg.rate_bps <= 0) return;
  if (now > c.t_tokens) {
    c.tokens = std::min(static_cast<double>(c.burst), c.tokens + c.cfg.rate_bps * static_cast<double>(now - c.t_tokens) * 1e-9);
    c.t_tokens = now;
  }
}

bool Arbiter::eligible(Class& c, int64_t now) {
  if (c.q.empty()) return false;
  bool ok = true;
  if (c.cfg.rate_bps > 0) {
    refill(c, now);
    ok = c.tokens >= static_cast<double>(std::min<uint64_t>(c.q.front().bytes, c.burst));
  }
  if (!ok && c.throttled_since < 0) c.throttled_since = now;
  if (ok && c.throttled_since >= 0) {
    c.st.throttled_ns += now - c.throttled_since;
    c.throttled_since = -1;
  }
  return ok;
}

void Arbiter::grant(int ci, int64_t now, Grant* out, bool starved) {
  Class& c = cls_[static_cast<size_t>(ci)];
  Op op = c.q.front();
  c.q.pop_front();
  --c.st.queued;
  --total_queued_;
  if (c.cfg.rate_bps > 0) c.tokens -= static_cast<double>(op.bytes);
  c.st.bytes += op.bytes;
  ++c.st.ops;
  if (starved) ++c.st.starvation_grants;
  int64_t waited = now - op.t_enq;
  ++c.wait_hist[static_cast<size_t>(bucket_of(waited))];
  c.st.wait_max_ns = std::max(c.st.wait_max_ns, waited);
  out->cls = ci;
  out->op = op.id;
  out->bytes = op.bytes;
  out->waited_ns = waited;
}

bool Arbiter::dequeue(int64_t now, Grant* out, int min_level) {
  if (!total_queued_) return false;
  // 2. Starvation guard: the oldest eligible head past the bound, whatever its level.
  int oldest = -1;
  int64_t t_oldest = INT64_MAX;
  for (size_t i = 0; i < cls_.size(); ++i) {
    Class& c = cls_[i];
    if (c.q.empty() || c.cfg.level < min_level || now - c.q.front().t_enq <= bound_ns_ || c.q.front().t_enq >= t_oldest)
      continue;
    if (!eligible(c, now)) continue;
    oldest = static_cast<int>(i);
    t_oldest = c.q.front().t_enq;
  }
  if (oldest >= 0) {
    // Counted as a starvation grant only when it jumped ahead of a higher level's work; an
    // op that merely waited long behind its own class (a window, a rate limit) is not one.
    const int lvl = cls_[static_cast<size_t>(oldest)].cfg.level;
    bool jumped = false;
    for (auto& c : cls_)
      if (!jumped && c.cfg.level > lvl && eligible(c, now)) jumped = true;
    grant(oldest, now, out, jumped);
    return true;
  }
  // 3-4. Highest level with an eligible head; deficit round robin inside it.
  for (size_t li = 0; li < levels_.size() && levels_[li] >= min_level; ++li) {
    const auto& members = by_level_[li];
    size_t n = members.size();
    for (int pass = 0; pass < 2; ++pass) {
      for (size_t v = 0; v < n; ++v) {
        Class& c = cls_[static_cast<size_t>(members[rr_[li]])];
        auto advance = [&] {
          rr_[li] = (rr_[li] + 1) % n;
          fresh_[li] = true;
        };
        if (!eligible(c, now)) {
          if (c.q.empty()) c.deficit = 0;  // an idle class keeps no credit
          advance();
          continue;
        }
        if (fresh_[li]) {
          c.deficit += static_cast<int64_t>(c.cfg.weight) * static_cast<int64_t>(quantum_);
          fresh_[li] = false;
        }
        if (c.q.front().bytes <= static_cast<uint64_t>(c.deficit)) {
          c.deficit -= static_cast<int64_t>(c.q.front().bytes);
          grant(members[rr_[li]], now, out, false);
          if (c.q.empty()) {
            c.deficit = 0;
            advance();
          }
          return true;
        }
        advance();  // keeps its deficit for the next round
      }
      if (pass == 1) break;
      // A whole round served nothing: every eligible head is larger than its deficit. Skip
      // ahead the rounds in which nothing could be served: r - 1 quanta to every eligible
      // class, where r is the fewest rounds after which some head fits; the next pass adds the
      // r-th on its visit.
      int64_t r = INT64_MAX;
      for (int ci : members) {
        Class& c = cls_[static_cast<size_t>(ci)];
        if (!eligible(c, now)) continue;
        int64_t q = static_cast<int64_t>(c.cfg.weight) * static_cast<int64_t>(quantum_);
        int64_t need = static_cast<int64_t>(c.q.front().bytes) - c.deficit;
        r = std::min(r, (need + q - 1) / q);
      }
      if (r == INT64_MAX) break;  // nothing eligible at this level
      for (int ci : members) {
        Class& c = cls_[static_cast<size_t>(ci)];
        if (!c.q.empty() && eligible(c, now))
          c.deficit += (r - 1) * static_cast<int64_t>(c.cfg.weight) * static_cast<int64_t>(quantum_);
      }
    }
  }
  return false;
}

int64_t Arbiter::next_eligible(int64_t now) {
  int64_t t = INT64_MAX;
  for (auto& c : cls_) {
    if (c.q.empty() || c.cfg.rate_bps <= 0 || eligible(c, now)) continue;
    double need = static_cast<double>(std::min<uint64_t>(c.q.front().bytes, c.burst)) - c.tokens;
    t = std::min(t, now + static_cast<int64_t>(std::ceil(need / c.cfg.rate_bps * 1e9)));
  }
  return t;
}

ClassStats Arbiter::stats(int ci) const {
  const Class& c = cls_.at(static_cast<size_t>(ci));
  ClassStats s = c.st;
  s.wait_p50_ns = quantile(c.wait_hist, 0.50);
  s.wait_p99_ns = quantile(c.wait_hist, 0.99);
  return s;
}

}  // namespace qos
}  // namespace dpmove
