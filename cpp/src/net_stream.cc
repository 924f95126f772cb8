// Sender side of the socket transports.
//
// tcp: each request is cut into at most one piece per stream (contiguous runs of entries,
//   balanced by bytes); a piece goes out as WRITE frames whose payload is written with
//   writev straight from the source region (no staging), then an END frame. The receiver
//   recv()s each payload straight into the exposed region.
// shm: one stream over the unix socket. The sender maps the peer's memfd (MAP request on a
//   control connection, fd passed with SCM_RIGHTS), copies each entry with one memcpy, then
//   sends END listing the extents it wrote so the receiver can check them.
// Both: the receiver ACKs a request on its primary stream once every stream's END arrived;
//   the ACK lists refused entries. Entries finish on the ACK (0 or the refusal), or with
//   -ETIMEDOUT / -ECANCELED once the request ended that way and no stream still sends from its
//   buffer, or with the transport's error when the connection breaks.
//
// Threads: one per stream, non-blocking socket + poll(), woken by an eventfd on post() and
// cancel. Stream 0's thread also applies deadlines (reap()).
#include <poll.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <unordered_map>

#include "dpmove/net.h"
#include "dpmove/status.h"

namespace dpmove {
namespace net {

namespace {

constexpr int kIovMax = 1024;
// A request smaller than this goes to one stream (round robin by request): splitting it would
// cost more in END/ACK bookkeeping than the parallelism gains.
constexpr int64_t kSplitBytes = 1 << 20;
// A stream whose head request ended (deadline or cancel) and that made no progress for this
// long is reset: the peer is stalled and the frame cannot be abandoned half-sent.
constexpr int64_t kStallResetNs = 200 * 1000000LL;

struct Mapping {
  uint8_t* base = nullptr;  // first byte of the exposed region in our address space
  uint64_t size = 0;
  void* map = MAP_FAILED;
  size_t map_len = 0;
  ~Mapping() {
    if (map != MAP_FAILED) munmap(map, map_len);
  }
};

struct InFlight {
  std::shared_ptr<PutOp> op;
  std::vector<uint32_t> started;  // entries handed to a stream (guarded by the transport's mu_)
  int sending = 0;                // pieces not yet fully written (guarded by mu_)
  bool acked = false;             // the receiver's ACK arrived (guarded by mu_)
  std::vector<AckFailure> ack;    // its refusals
};

struct Piece {
  std::shared_ptr<InFlight> fl;
  std::vector<uint32_t> entries;
  bool primary = false;
  uint32_t nstreams = 1;
  std::shared_ptr<Mapping> map;  // shm
};

class StreamTransport final : public Transport, public std::enable_shared_from_this<StreamTransport> {
 public:
  StreamTransport(bool shm, std::string peer) : shm_(shm), peer_(std::move(peer)) {
    for (const char* k : {"requests_posted", "entries_posted", "requests_acked", "entries_refused"}) stats_[k] = 0;
  }
  ~StreamTransport() override { shutdown(ECONNABORTED, "transport closed"); }

  // Connects every stream and the shm control connection, then starts the threads.
  void open(Agent& local, const Metadata& remote, const ConnectOptions& o);

  const char* name() const override { return shm_ ? "shm" : "tcp"; }
  void post(std::shared_ptr<PutOp> op) override;
  void prepare(const RemoteHandle& dst) override;
  bool prepared(const RemoteHandle& dst) const override {
    if (!shm_) return true;
    std::lock_guard<std::mutex> lk(map_mu_);
    return maps_.count(dst.key) > 0;
  }
  void kick() override {
    if (!streams_.empty()) wake(*streams_[0]);
  }
  void shutdown(int err, const std::string& why) override;
  std::string broken() const override {
    std::lock_guard<std::mutex> lk(mu_);
    return broken_;
  }
  std::map<std::string, int64_t> stats() const override {
    std::lock_guard<std::mutex> lk(mu_);
    auto s = stats_;
    s["in_flight_requests"] = static_cast<int64_t>(inflight_.size());
    s["streams"] = static_cast<int64_t>(streams_.size());
    return s;
  }

 private:
  struct Stream {
    int fd = -1, wake = -1;
    std::thread th;
    std::deque<Piece> q;  // guarded by mu_
    // tx: the piece being written, its frames and the iovecs still to write.
    bool busy = false;
    std::vector<Piece> cur;  // pieces written together (one sendmsg for many small requests)
    std::vector<Frame> hdrs;
    std::vector<std::vector<uint8_t>> trailers;
    std::vector<iovec> iov;
    size_t iov_i = 0;
    int64_t last_progress = 0;
    // rx: a frame and its trailer being read.
    Frame rx{};
    size_t rx_got = 0;
    std::vector<uint8_t> rx_trailer;
    size_t rx_tgot = 0;
    std::vector<uint8_t> rbuf = std::vector<uint8_t>(64 * 1024);
    size_t rpos = 0, rend = 0;
    ~Stream() {
      if (fd >= 0) ::close(fd);
      if (wake >= 0) ::close(wake);
    }
  };

  void wake(Stream& s) {
    uint64_t one = 1;
    (void)!::write(s.wake, &one, sizeof one);
  }
  void run(size_t k);
  void build(Stream& s);
  void build_piece(Stream& s, Piece& p);
  int flush(Stream& s);          // 1 piece fully written, 0 would block, <0 -errno
  int read_frames(Stream& s);    // 0 or -errno
  void complete(uint64_t seq, const AckFailure* f, size_t n);
  void finish_acked(InFlight& fl);
  int64_t reap();                // returns the earliest pending deadline
  void fail(int err, const std::string& why);
  void finish_all();
  void bump(const char* k, int64_t n = 1) { stats_[k] += n; }  // under mu_

  const bool shm_;
  const std::string peer_;
  std::vector<std::unique_ptr<Stream>> streams_;
  mutable std::mutex mu_;
  std::map<uint64_t, std::shared_ptr<InFlight>> inflight_;
  std::map<std::string, int64_t> stats_;
  std::string broken_;
  int broken_err_ = 0;
  bool stop_ = false;
  int live_ = 0;
  bool finished_all_ = false;
  bool joined_ = false;
  uint64_t rr_ = 0;
  bool urgent_lane_ = false;  // set before the threads start

  std::mutex join_mu_;  // serialises shutdown()'s joins

  // shm
  int ctl_fd_ = -1;
  std::mutex ctl_mu_;          // one map exchange at a time; held across its network I/O
  mutable std::mutex map_mu_;  // maps_ only; never held across I/O
  std::unordered_map<uint32_t, std::shared_ptr<Mapping>> maps_;
};

void StreamTransport::open(Agent& local, const Metadata& remote, const ConnectOptions& o) {
  int64_t dl = now_ns() + o.timeout_ns;
  uint64_t session;
  Id128 r = random_id();
  std::memcpy(&session, r.data(), sizeof session);
  // shm: one copy thread per stream. With the urgent lane, one more stream (number 0) for the
  // top QoS level, so the `streams` the caller asked for all carry the rest.
  int nstreams = o.streams + (o.urgent_lane ? 1 : 0);
  std::string last_err;
  auto connect_one = [&](Channel ch, uint32_t k) -> int {
    int fd = -1;
    std::string why;
    if (shm_) {
      fd = dial_unix(remote.unix_name, dl);
      if (fd < 0) {
        last_err = "connect(unix @" + remote.unix_name + "): " + errno_str(-fd);
        return fd;
      }
    } else {
      int err = -ENOTCONN;
      for (const Endpoint& e : remote.tcp) {
        fd = dial_tcp(e, dl);
        if (fd >= 0) break;
        err = fd;
        last_err = "connect(" + e.str() + "): " + errno_str(-fd);
      }
      if (fd < 0) return err;
    }
    int h = hello(fd, ch, k, session, static_cast<uint32_t>(nstreams), remote.engine_id, local.engine_id(), local.name(), dl, &why);
    if (h < 0) {
      ::close(fd);
      last_err = "handshake: " + (why.empty() ? errno_str(-h) : why);
      return h;
    }
    return fd;
  };
  for (int k = 0; k < nstreams; ++k) {
    int fd = connect_one(shm_ ? Channel::kShmData : Channel::kTcpData, static_cast<uint32_t>(k));
    if (fd < 0) throw_sys(-fd, "connect to " + peer_ + " over " + name() + ": " + last_err);
    auto s = std::make_unique<Stream>();
    s->fd = fd;
    s->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->wake < 0) throw_sys(errno, "eventfd");
    if (!shm_) {
      // Room for a few MiB in flight per stream; the kernel caps it at net.core.wmem_max.
      int sz = 8 << 20;
      setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    }
    streams_.push_back(std::move(s));
  }
  if (shm_) {
    ctl_fd_ = connect_one(Channel::kControl, 0);
    if (ctl_fd_ < 0) throw_sys(-ctl_fd_, "connect to " + peer_ + " over shm (control): " + last_err);
  }
  std::lock_guard<std::mutex> lk(mu_);
  live_ = static_cast<int>(streams_.size());
  urgent_lane_ = o.urgent_lane;
  for (size_t k = 0; k < streams_.size(); ++k)
    streams_[k]->th = std::thread([this, k] {
      // Bulk lanes yield the CPU to the urgent one (raising one's own nice value needs no
      // privilege; a failure only loses the hint).
      if (urgent_lane_ && k > 0) (void)!setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
      run(k);
    });
}

void StreamTransport::prepare(const RemoteHandle& dst) {
  if (!shm_) return;
  std::lock_guard<std::mutex> xk(ctl_mu_);  // one map exchange at a time on the control channel
  {
    std::lock_guard<std::mutex> lk(map_mu_);
    if (maps_.count(dst.key)) return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_) throw SysError(broken_err_, peer_ + " is disconnected (" + broken_ + ")");
  }
  std::string what = "shm: mapping region " + std::to_string(dst.key) + " of " + peer_;
  // Any failure of the exchange itself leaves the channel out of step (a late reply would
  // answer the next request), so it breaks the transport; refusals keep it usable.
  auto broken = [&](int err, const std::string& why) {
    fail(err, what + ": " + why);
    throw_sys(err, what + ": " + why);
  };
  int64_t dl = now_ns() + int64_t{10} * 1000000000;
  Frame f;
  f.type = static_cast<uint16_t>(FrameType::kMap);
  f.key = dst.key;
  int r = send_frame(ctl_fd_, f, nullptr, 0, dl);
  if (r < 0) broken(-r, "sending the request: " + errno_str(-r));
  // The reply frame carries the memfd as SCM_RIGHTS on its first byte.
  Frame ok;
  alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int) * 4)];
  int fd = -1;
  struct FdGuard {
    int& fd;
    ~FdGuard() {
      if (fd >= 0) ::close(fd);
    }
  } guard{fd};
  size_t got = 0;
  while (got < sizeof ok) {
    msghdr mh{};
    iovec iov{reinterpret_cast<uint8_t*>(&ok) + got, sizeof ok - got};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl;
    mh.msg_controllen = sizeof ctl;
    ssize_t n = ::recvmsg(ctl_fd_, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n > 0) {
      for (cmsghdr* cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
        size_t nfd = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < nfd; ++i) {
          int x;
          std::memcpy(&x, CMSG_DATA(cm) + i * sizeof(int), sizeof x);
          if (fd < 0) fd = x; else ::close(x);  // one fd expected; never leak extras
        }
      }
      if (mh.msg_flags & MSG_CTRUNC) broken(EPROTO, "the reply carried more descriptors than expected");
      got += static_cast<size_t>(n);
      continue;
    }
    if (n == 0) broken(ECONNRESET, "the peer closed the control connection");
    if (errno == EINTR) continue;
    if (errno != EAGAIN) broken(errno, "reading the reply: " + errno_str(errno));
    pollfd p{ctl_fd_, POLLIN, 0};
    int64_t left = dl - now_ns();
    if (left <= 0) broken(ETIMEDOUT, "no reply within 10 s (the peer is stalled?)");
    ::poll(&p, 1, static_cast<int>(left / 1000000 + 1));
  }
  if (ok.magic != kFrameMagic || ok.type != static_cast<uint16_t>(FrameType::kMapOk) || ok.key != dst.key)
    broken(EPROTO, "unexpected reply");
  if (ok.aux == ENOENT) throw_sys(ENOENT, what + ": it has no such region exposed (unexposed, or a stale handle)");
  if (ok.aux == EACCES) throw UnsupportedError(EACCES, what + ": the region is exposed read-only");
  if (ok.aux == EOPNOTSUPP)
    throw UnsupportedError(EOPNOTSUPP, what + ": it is a registered Python buffer, which cannot be shared; expose a region "
                                              "from Engine.alloc() or connect with transport='tcp'");
  if (ok.aux != 0 || fd < 0) broken(ok.aux ? static_cast<int>(ok.aux) : EPROTO, "refused without a reason");
  if (ok.length != dst.size || ok.offset > ok.extra || ok.length > ok.extra - ok.offset)
    throw_sys(EPROTO, what + ": the peer describes it as " + std::to_string(ok.length) + " bytes, the handle says " +
                          std::to_string(dst.size));
  // The memfd must really hold the range and be sealed against shrinking: a peer that shrank
  // it under our mapping would turn our copies into SIGBUS.
  struct stat st;
  int seals = fcntl(fd, F_GET_SEALS);
  if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < ok.offset + ok.length)
    throw_sys(EPROTO, what + ": the shared memory is smaller than the region");
  if (seals < 0 || !(seals & F_SEAL_SHRINK)) throw_sys(EPROTO, what + ": the shared memory is not sealed against shrinking");
  auto m = std::make_shared<Mapping>();
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  size_t start = static_cast<size_t>(ok.offset) / page * page;
  size_t end = static_cast<size_t>(ok.offset + ok.length);
  m->map_len = std::max<size_t>(end - start, 1);
  // MAP_POPULATE: fault the page tables in now, not on the first copy of each page.
  m->map = mmap(nullptr, m->map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, static_cast<off_t>(start));
  if (m->map == MAP_FAILED) throw_sys(errno, what + ": mmap");
  m->base = static_cast<uint8_t*>(m->map) + (ok.offset - start);
  m->size = ok.length;
  std::lock_guard<std::mutex> lk(map_mu_);
  maps_[dst.key] = m;
}

void StreamTransport::post(std::shared_ptr<PutOp> op) {
  Request& r = *op->req;
  auto fl = std::make_shared<InFlight>();
  fl->op = op;
  std::shared_ptr<Mapping> map;
  if (shm_) {
    std::lock_guard<std::mutex> lk(map_mu_);
    auto it = maps_.find(op->dst.key);
    if (it != maps_.end()) map = it->second;
  }
  std::unique_lock<std::mutex> lk(mu_);
  if (stop_ || (shm_ && !map)) {
    int err = stop_ ? broken_err_ : EPROTO;
    lk.unlock();
    for (size_t i = 0; i < r.size(); ++i)
      if (r.start(i)) r.finish(i, -err, 0);
    return;
  }
  // Split by bytes into runs, one per stream. With the urgent lane (QoS on), stream 0 is kept
  // for top-level (urgent) requests and the others carry the rest, so a latency-critical
  // write never queues behind a bulk one on the same socket or thread.
  size_t n = r.size();
  size_t lo = 0, ns = streams_.size();
  if (urgent_lane_) {
    lo = op->urgent ? 0 : 1;
    ns = op->urgent ? 1 : ns - 1;
  }
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += r.entry(i).length;
  std::vector<Piece> pieces;
  if (ns == 1 || total < kSplitBytes || n < 2) {
    Piece p;
    p.entries.resize(n);
    for (size_t i = 0; i < n; ++i) p.entries[i] = static_cast<uint32_t>(i);
    pieces.push_back(std::move(p));
  } else {
    int64_t per = (total + static_cast<int64_t>(ns) - 1) / static_cast<int64_t>(ns);
    Piece p;
    int64_t acc = 0;
    for (size_t i = 0; i < n; ++i) {
      p.entries.push_back(static_cast<uint32_t>(i));
      acc += r.entry(i).length;
      if (acc >= per && pieces.size() + 1 < ns) {
        pieces.push_back(std::move(p));
        p = Piece();
        acc = 0;
      }
    }
    if (!p.entries.empty()) pieces.push_back(std::move(p));
  }
  size_t first = static_cast<size_t>(rr_++ % ns);
  fl->sending = static_cast<int>(pieces.size());
  inflight_[op->seq] = fl;
  bump("requests_posted");
  bump("entries_posted", static_cast<int64_t>(n));
  for (size_t k = 0; k < pieces.size(); ++k) {
    Piece& p = pieces[k];
    p.fl = fl;
    p.primary = k == 0;
    p.nstreams = static_cast<uint32_t>(pieces.size());
    p.map = map;
    Stream& s = *streams_[lo + (first + k) % ns];
    bool was_empty = s.q.empty() && !s.busy;
    s.q.push_back(std::move(p));
    if (was_empty) wake(s);
  }
}

void StreamTransport::build(Stream& s) {
  size_t total = 0;
  for (const Piece& p : s.cur) total += p.entries.size();
  s.hdrs.clear();
  s.hdrs.reserve(total + s.cur.size());  // iovecs point into hdrs: it must not reallocate
  s.trailers.clear();
  s.trailers.reserve(s.cur.size());  // nor may trailers' buffers move
  s.iov.clear();
  s.iov_i = 0;
  for (Piece& p : s.cur) build_piece(s, p);
}

void StreamTransport::build_piece(Stream& s, Piece& p) {
  PutOp& op = *p.fl->op;
  Request& r = *op.req;
  const uint8_t* src = r.region()->data();
  size_t n = p.entries.size();
  std::vector<uint32_t> started;
  started.reserve(n);
  std::vector<Extent> ext;
  int64_t t0 = r.timing() ? now_ns() : 0;
  for (uint32_t idx : p.entries) {
    if (!r.start(idx)) continue;  // the request ended first: this entry was swept
    r.set_start_time(idx, t0);
    const IoEntry& e = r.entry(idx);
    started.push_back(idx);
    if (shm_) {
      std::memcpy(p.map->base + e.file_offset, src + e.region_offset, static_cast<size_t>(e.length));
      ext.push_back({op.dst.key, idx, static_cast<uint64_t>(e.file_offset), static_cast<uint64_t>(e.length)});
    } else {
      Frame w;
      w.type = static_cast<uint16_t>(FrameType::kWrite);
      w.key = op.dst.key;
      w.aux = idx;
      w.req = op.seq;
      w.offset = static_cast<uint64_t>(e.file_offset);
      w.length = static_cast<uint64_t>(e.length);
      s.hdrs.push_back(w);
      s.iov.push_back({&s.hdrs.back(), sizeof(Frame)});
      if (e.length) s.iov.push_back({const_cast<uint8_t*>(src + e.region_offset), static_cast<size_t>(e.length)});
    }
  }
  Frame end;
  end.type = static_cast<uint16_t>(FrameType::kEnd);
  end.req = op.seq;
  end.aux = static_cast<uint32_t>(started.size());
  end.offset = p.nstreams;
  end.key = static_cast<uint32_t>(r.size());
  s.trailers.emplace_back();
  std::vector<uint8_t>& trailer = s.trailers.back();
  if (p.primary) {
    end.flags |= kEndPrimary;
    if (op.has_notify) {
      end.flags |= kEndNotify;
      trailer = op.notify;
      end.extra = op.notify.size();
    }
  }
  if (shm_) {
    end.flags |= kEndExtents;
    size_t at = trailer.size();
    trailer.resize(at + ext.size() * sizeof(Extent));
    if (!ext.empty()) std::memcpy(trailer.data() + at, ext.data(), ext.size() * sizeof(Extent));
  }
  end.length = trailer.size();
  s.hdrs.push_back(end);
  s.iov.push_back({&s.hdrs.back(), sizeof(Frame)});
  if (!trailer.empty()) s.iov.push_back({trailer.data(), trailer.size()});
  std::lock_guard<std::mutex> lk(mu_);
  auto& st = p.fl->started;
  st.insert(st.end(), started.begin(), started.end());
}

int StreamTransport::flush(Stream& s) {
  while (s.iov_i < s.iov.size()) {
    int cnt = static_cast<int>(std::min<size_t>(s.iov.size() - s.iov_i, kIovMax));
    msghdr mh{};
    mh.msg_iov = s.iov.data() + s.iov_i;
    mh.msg_iovlen = static_cast<size_t>(cnt);
    ssize_t w = ::sendmsg(s.fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return 0;
      return -errno;
    }
    s.last_progress = now_ns();
    size_t left = static_cast<size_t>(w);
    while (left > 0 && s.iov_i < s.iov.size()) {
      iovec& v = s.iov[s.iov_i];
      if (left >= v.iov_len) {
        left -= v.iov_len;
        ++s.iov_i;
      } else {
        v.iov_base = static_cast<uint8_t*>(v.iov_base) + left;
        v.iov_len -= left;
        left = 0;
      }
    }
    while (s.iov_i < s.iov.size() && s.iov[s.iov_i].iov_len == 0) ++s.iov_i;
  }
  return 1;
}

int StreamTransport::read_frames(Stream& s) {
  for (;;) {
    // Parse what is buffered: a frame header, then its trailer, then handle it.
    while (s.rpos < s.rend) {
      size_t avail = s.rend - s.rpos;
      if (s.rx_got < sizeof(Frame)) {
        size_t k = std::min(avail, sizeof(Frame) - s.rx_got);
        std::memcpy(reinterpret_cast<uint8_t*>(&s.rx) + s.rx_got, s.rbuf.data() + s.rpos, k);
        s.rx_got += k;
        s.rpos += k;
        if (s.rx_got < sizeof(Frame)) break;
        if (s.rx.magic != kFrameMagic) return -EPROTO;
        auto t = static_cast<FrameType>(s.rx.type);
        uint64_t max = t == FrameType::kAck ? uint64_t{1 << 20} * sizeof(AckFailure) : 1024;
        if ((t != FrameType::kAck && t != FrameType::kError) || s.rx.length > max) return -EPROTO;
        if (t == FrameType::kAck && s.rx.length != uint64_t{s.rx.aux} * sizeof(AckFailure)) return -EPROTO;
        s.rx_trailer.resize(static_cast<size_t>(s.rx.length));
        s.rx_tgot = 0;
      } else {
        size_t k = std::min(avail, s.rx_trailer.size() - s.rx_tgot);
        std::memcpy(s.rx_trailer.data() + s.rx_tgot, s.rbuf.data() + s.rpos, k);
        s.rx_tgot += k;
        s.rpos += k;
      }
      if (s.rx_got < sizeof(Frame) || s.rx_tgot < s.rx_trailer.size()) continue;
      s.rx_got = 0;
      if (static_cast<FrameType>(s.rx.type) == FrameType::kError) {
        std::string msg(s.rx_trailer.begin(), s.rx_trailer.end());
        int err = static_cast<int>(s.rx.aux);
        err = err > 0 && err < 4096 ? err : EPROTO;
        fail(err, peer_ + " closed the connection: " + msg);
        return -err;
      }
      const auto* fails = reinterpret_cast<const AckFailure*>(s.rx_trailer.data());
      std::vector<AckFailure> copy(fails, fails + s.rx.aux);  // rx_trailer is reused
      complete(s.rx.req, copy.data(), copy.size());
    }
    // Refill: one recv takes every ACK that has arrived.
    ssize_t n = ::recv(s.fd, s.rbuf.data(), s.rbuf.size(), MSG_DONTWAIT);
    if (n == 0) return -ECONNRESET;
    if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -errno;
    s.rpos = 0;
    s.rend = static_cast<size_t>(n);
  }
}

void StreamTransport::complete(uint64_t seq, const AckFailure* f, size_t n) {
  std::shared_ptr<InFlight> fl;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = inflight_.find(seq);
    if (it == inflight_.end()) return;  // already ended (deadline / cancel): nothing to finish
    fl = it->second;
    bump("requests_acked");
    if (n) bump("entries_refused", static_cast<int64_t>(n));
    fl->ack.assign(f, f + n);
    fl->acked = true;
    // Another stream's thread may not have recorded yet that its piece went out (its sendmsg
    // returned, the receiver answered first); a hostile receiver may even ACK before. The
    // entries are finished by whoever sees both: the ACK and no piece still sending.
    if (fl->sending > 0) return;
    inflight_.erase(it);
  }
  finish_acked(*fl);
}

void StreamTransport::finish_acked(InFlight& fl) {
  std::vector<uint32_t> started;
  {
    std::lock_guard<std::mutex> lk(mu_);
    started.swap(fl.started);
  }
  Request& r = *fl.op->req;
  std::unordered_map<uint32_t, int32_t> refused;
  bool unmap = false;
  for (const AckFailure& a : fl.ack) {
    refused[a.entry] = a.status < 0 ? a.status : -EPROTO;
    unmap = unmap || a.status == -ENOENT;
  }
  if (shm_ && unmap) {
    // The receiver no longer exposes the region: forget our mapping, so the next write asks
    // again and is refused before it copies anything.
    std::lock_guard<std::mutex> lk(map_mu_);
    maps_.erase(fl.op->dst.key);
  }
  for (uint32_t idx : started) {
    auto it = refused.find(idx);
    int32_t st = it == refused.end() ? 0 : it->second;
    r.finish(idx, st, st == 0 ? r.entry(idx).length : 0);
  }
}

int64_t StreamTransport::reap() {
  std::vector<std::shared_ptr<InFlight>> ended;
  int64_t next = INT64_MAX;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto it = inflight_.begin(); it != inflight_.end();) {
      Request& r = *it->second->op->req;
      if (r.poll() != ReqState::kPending && it->second->sending == 0) {
        ended.push_back(it->second);
        it = inflight_.erase(it);
        continue;
      }
      if (r.state() == ReqState::kPending) next = std::min(next, r.deadline_ns());
      ++it;
    }
  }
  for (auto& fl : ended) {
    Request& r = *fl->op->req;
    int32_t st = r.state() == ReqState::kCancelled ? -ECANCELED : -ETIMEDOUT;
    std::vector<uint32_t> started;
    {
      std::lock_guard<std::mutex> lk(mu_);
      started.swap(fl->started);
    }
    // The bytes were written to the socket (or copied), but the peer has not confirmed them
    // before the request ended: the entry's outcome is unknown, so it is not reported as done.
    for (uint32_t idx : started) r.finish(idx, st, 0);
  }
  return next;
}

void StreamTransport::run(size_t k) {
  Stream& s = *streams_[k];
  int64_t next_deadline = INT64_MAX;
  int64_t last_reap = 0;
  for (;;) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stop_) break;
      if (!s.busy && !s.q.empty()) {
        // Several queued pieces go out in one sendmsg; bounded so a batch stays a few MiB of
        // headers and extents at most.
        size_t entries = 0;
        s.cur.clear();
        while (!s.q.empty() && s.cur.size() < 64 && entries < 8192) {
          entries += s.q.front().entries.size();
          s.cur.push_back(std::move(s.q.front()));
          s.q.pop_front();
        }
        s.busy = true;
      }
    }
    bool progress = false;
    if (s.busy && s.iov.empty()) {
      build(s);
      s.last_progress = now_ns();
    }
    if (s.busy) {
      int r = flush(s);
      if (r < 0) {
        fail(-r, r == -EPIPE || r == -ECONNRESET ? peer_ + " closed the connection (the process exited or was killed): " + errno_str(-r)
                                                  : "sending to " + peer_ + ": " + errno_str(-r));
        break;
      }
      if (r == 1) {
        std::vector<std::shared_ptr<InFlight>> acked;  // ACKed while this batch was going out
        std::vector<Piece> done;  // destroyed after the lock: may drop the last request reference
        {
          std::lock_guard<std::mutex> lk(mu_);
          for (Piece& p : s.cur)
            if (--p.fl->sending == 0 && p.fl->acked && inflight_.erase(p.fl->op->seq)) acked.push_back(p.fl);
          done.swap(s.cur);
          s.busy = false;
        }
        for (auto& fl : acked) finish_acked(*fl);
        s.trailers.clear();
        s.iov.clear();
        s.hdrs.clear();
        progress = true;
      }
    }
    int r = read_frames(s);
    if (r < 0) {
      fail(-r, r == -ECONNRESET ? peer_ + " closed the connection (the process exited or was killed)"
                                : "receiving from " + peer_ + ": " + errno_str(-r));
      break;
    }
    int64_t now = now_ns();
    if (k == 0 && (now - last_reap > 2000000 || now >= next_deadline)) {
      next_deadline = reap();
      last_reap = now;
    }
    bool ended = false;  // a request in the half-sent batch has ended (deadline, cancel)
    if (s.busy && s.iov_i < s.iov.size() && now - s.last_progress > kStallResetNs)
      for (Piece& p : s.cur) ended = ended || p.fl->op->req->poll() != ReqState::kPending;
    if (ended) {
      fail(ETIMEDOUT, peer_ + " stopped reading (stalled) while a request that had ended was half sent; "
                      "the connection was reset");
      break;
    }
    if (progress) continue;
    int timeout_ms = 1000;
    if (k == 0) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!inflight_.empty()) timeout_ms = 10;
    }
    if (next_deadline != INT64_MAX)
      timeout_ms = static_cast<int>(std::clamp<int64_t>((next_deadline - now) / 1000000 + 1, 0, timeout_ms));
    if (s.busy) timeout_ms = std::min(timeout_ms, 50);
    pollfd p[2] = {{s.fd, static_cast<short>(POLLIN | (s.busy ? POLLOUT : 0)), 0}, {s.wake, POLLIN, 0}};
    ::poll(p, 2, timeout_ms);
    if (p[1].revents & POLLIN) {
      uint64_t v;
      (void)!::read(s.wake, &v, sizeof v);
    }
  }
  bool last;
  {
    std::lock_guard<std::mutex> lk(mu_);
    last = --live_ == 0;
  }
  if (last) finish_all();
}

void StreamTransport::fail(int err, const std::string& why) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (broken_.empty()) {
      broken_ = why;
      broken_err_ = err ? err : EIO;
    }
    stop_ = true;
  }
  for (auto& s : streams_) {
    ::shutdown(s->fd, SHUT_RDWR);
    wake(*s);
  }
  if (ctl_fd_ >= 0) ::shutdown(ctl_fd_, SHUT_RDWR);  // wakes a prepare() waiting for a reply
}

// Runs once, on the last stream thread to stop: no thread touches a source buffer any more.
void StreamTransport::finish_all() {
  std::vector<std::shared_ptr<InFlight>> all;
  std::string why;
  int err;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (finished_all_) return;
    finished_all_ = true;
    for (auto& kv : inflight_) all.push_back(kv.second);
    inflight_.clear();
    for (auto& s : streams_) s->q.clear();
    why = broken_;
    err = broken_err_;
  }
  for (auto& fl : all) {
    Request& r = *fl->op->req;
    r.set_detail(why);
    std::vector<uint32_t> started;
    {
      std::lock_guard<std::mutex> lk(mu_);
      started.swap(fl->started);
    }
    // A request that had already ended keeps the cause it ended with.
    ReqState st = r.state();
    int32_t code = st == ReqState::kCancelled ? -ECANCELED : st == ReqState::kTimedOut ? -ETIMEDOUT : -err;
    for (uint32_t idx : started) r.finish(idx, code, 0);
    // Entries queued but never started.
    for (size_t i = 0; i < r.size(); ++i)
      if (r.start(i)) r.finish(i, -err, 0);
  }
}

void StreamTransport::shutdown(int err, const std::string& why) {
  fail(err, why);
  std::lock_guard<std::mutex> jl(join_mu_);
  if (joined_) return;
  for (auto& s : streams_)
    if (s->th.joinable() && s->th.get_id() != std::this_thread::get_id()) s->th.join();
  joined_ = true;
  finish_all();  // when no thread ever started
  std::lock_guard<std::mutex> xk(ctl_mu_);  // fail() shut it down: a prepare() in progress returns
  if (ctl_fd_ >= 0) {
    ::close(ctl_fd_);
    ctl_fd_ = -1;
  }
}

}  // namespace

std::shared_ptr<Transport> make_tcp_transport(Agent& local, const Metadata& remote, const ConnectOptions& o,
                                              const std::string& peer_name) {
  auto t = std::make_shared<StreamTransport>(false, peer_name);
  t->open(local, remote, o);
  return t;
}

std::shared_ptr<Transport> make_shm_transport(Agent& local, const Metadata& remote, const ConnectOptions& o,
                                              const std::string& peer_name) {
  auto t = std::make_shared<StreamTransport>(true, peer_name);
  t->open(local, remote, o);
  return t;
}

}  // namespace net
}  // namespace dpmove
