// Traffic-class arbitration: which queued operation goes next.
//
// Pure logic, no I/O and no clock of its own: every call takes `now` (ns, any monotonic
// origin), so tests replay exact arrival sequences. Not thread-safe: the owner serialises
// calls (a submission path holds its own lock around enqueue/dequeue).
//
// Policy, in order:
//  1. Eligibility: a class with a rate limit holds a token bucket (rate bytes/s, burst bytes).
//     Its head operation is eligible once the bucket holds min(op bytes, burst) tokens; serving
//     it takes op bytes (the bucket may go negative, so an operation larger than the burst
//     waits for its full cost to be repaid before the next one). Throttled time is counted
//     while a class has work but no tokens.
//  2. Starvation guard: an eligible head that has waited longer than `starvation_bound_ns` is
//     served first (the oldest such head), whatever its level.
//  3. Strict priority: otherwise the highest level with an eligible head.
//  4. Within a level, deficit round robin by bytes: each visit adds weight x quantum bytes to a
//     class's deficit; it sends while its head fits in the deficit. A class that empties loses
//     its deficit (no credit hoarding).
// Work-conserving: a throttled or empty class never blocks another class with work.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

namespace dpmove {
namespace qos {

struct ClassConfig {
  std::string name;
  int level = 0;              // higher is served first
  uint32_t weight = 1;        // DRR share within its level, >= 1
  double rate_bps = 0;        // bytes per second; 0: unlimited
  uint64_t burst_bytes = 0;   // bucket size; 0 with a rate: one second's worth
  uint8_t ib_sl = 0;          // verbs: InfiniBand service level
  uint8_t roce_tclass = 0;    // verbs: RoCE GRH traffic class (DSCP << 2)
};

struct Grant {
  int cls = -1;
  uint64_t op = 0;
  uint64_t bytes = 0;
  int64_t waited_ns = 0;
};

struct ClassStats {
  uint64_t bytes = 0;        // granted
  uint64_t ops = 0;          // granted
  uint64_t queued = 0;       // waiting now
  uint64_t starvation_grants = 0;  // served by the starvation guard ahead of a higher level
  int64_t throttled_ns = 0;  // time with work but no tokens
  int64_t wait_p50_ns = 0, wait_p99_ns = 0, wait_max_ns = 0;
};

class Arbiter {
 public:
  // Throws UsageError on a bad configuration (no classes, weight 0, negative rate, ...).
  Arbiter(std::vector<ClassConfig> classes, int64_t starvation_bound_ns, uint64_t quantum_bytes);

  size_t num_classes() const noexcept { return cls_.size(); }
  const ClassConfig& config(int c) const { return cls_.at(static_cast<size_t>(c)).cfg; }
  int find(const std::string& name) const;  // -1 when unknown

  void enqueue(int cls, uint64_t op, uint64_t bytes, int64_t now);
  // The next operation to start, or false when none is eligible now. Only classes of level
  // >= min_level are considered (a caller whose lower-level window is full passes top_level()).
  bool dequeue(int64_t now, Grant* out, int min_level = INT_MIN);
  int top_level() const noexcept { return levels_.front(); }
  // Earliest time a throttled class with work becomes eligible; INT64_MAX when none waits
  // for tokens (then either something is eligible now or nothing is queued).
  int64_t next_eligible(int64_t now);
  uint64_t queued() const noexcept { return total_queued_; }
  // Takes the queued operations of class `cls` for which pred(op id) holds out of the queue
  // (their request ended before its turn): no tokens or deficit are charged. A class left
  // with nothing queued stops counting throttled time at `now`. Returns how many.
  template <class Pred>
  size_t remove_if(int cls, int64_t now, Pred pred) {
    Class& c = cls_.at(static_cast<size_t>(cls));
    size_t before = c.q.size();
    for (auto it = c.q.begin(); it != c.q.end();) it = pred(it->id) ? c.q.erase(it) : it + 1;
    size_t gone = before - c.q.size();
    c.st.queued -= gone;
    total_queued_ -= gone;
    if (c.q.empty() && c.throttled_since >= 0) {
      c.st.throttled_ns += std::max<int64_t>(0, now - c.throttled_since);
      c.throttled_since = -1;
    }
    return gone;
  }

  ClassStats stats(int cls) const;

 private:
  struct Op {
    uint64_t id, bytes;
    int64_t t_enq;
  };
  struct Class {
    ClassConfig cfg;
    std::deque<Op> q;
    int64_t deficit = 0;
    double tokens = 0;
    int64_t t_tokens = 0;      // when tokens was last brought up to date
    int64_t throttled_since = -1;
    uint64_t burst = 0;
    ClassStats st;
    std::vector<uint32_t> wait_hist;  // log2-spaced buckets of wait time
  };
  void refill(Class& c, int64_t now);
  bool eligible(Class& c, int64_t now);
  void grant(int ci, int64_t now, Grant* out, bool starved);

  std::vector<Class> cls_;
  std::vector<int> levels_;                 // distinct levels, highest first
  std::vector<std::vector<int>> by_level_;  // class indices per entry of levels_
  std::vector<size_t> rr_;                  // DRR cursor per level
  std::vector<bool> fresh_;                 // the cursor's class has not had its quantum yet
  int64_t bound_ns_;
  uint64_t quantum_;
  uint64_t total_queued_ = 0;
};

}  // namespace qos
}  // namespace dpmove
