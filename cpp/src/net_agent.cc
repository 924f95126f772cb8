// Receiver side: listening sockets, exposed regions, inbound connections, notifications.
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <system_error>

#include "dpmove/net.h"
#include "dpmove/status.h"

namespace dpmove {
namespace net {

struct Agent::Conn {
  int fd = -1;
  bool is_unix = false;
  std::thread thread;
  std::atomic<bool> done{false};
  std::mutex wmu;  // serialises frames sent on fd (ACKs come from other connections' threads)
  ~Conn() {
    if (fd >= 0) ::close(fd);
  }
};

// Requests of one sender session (one Peer connection set) that have not ended on every
// stream yet. Keyed by the sender's request sequence.
struct Agent::Session {
  uint64_t id = 0;
  std::string peer;
  Id128 sender{};
  uint32_t streams = 1;
  std::mutex mu;
  struct Pending {
    uint32_t ended = 0, nstreams = 0;
    uint64_t total = 0, seen = 0;
    std::vector<AckFailure> failures;
    std::vector<uint8_t> notify;
    bool has_notify = false;
    std::weak_ptr<Conn> primary;
  };
  std::map<uint64_t, Pending> pending;
  uint64_t notify_bytes = 0;  // held by pending requests
  bool dead = false;
};

namespace {
constexpr size_t kMaxPending = 65536;                   // unfinished requests per session
constexpr uint64_t kMaxPendingNotify = 64ull << 20;     // their notification bytes
constexpr size_t kMaxConnections = 1024;                // inbound, all peers together
constexpr size_t kMaxNotifications = 1 << 20;           // queued, not yet taken
constexpr uint64_t kMaxNotificationBytes = 256ull << 20;
}  // namespace

namespace {
std::mutex g_handlers_mu;
std::map<uint32_t, ControlHandler>& handlers() {
  static std::map<uint32_t, ControlHandler> h;
  return h;
}

std::string hostname() {
  char buf[256] = {0};
  gethostname(buf, sizeof buf - 1);
  return buf;
}

// Buffered reads of one inbound stream. Frames and small payloads come through a bounded
// buffer (one recv for many small writes). A payload of kDirectBytes or more is received with
// recvmsg straight into its destination, followed by at most one frame header into the buffer,
// so a large payload is never copied through the buffer and the next header costs no extra
// call. This buffer is the only staging a payload passes through.
class Reader {
 public:
  static constexpr size_t kBufBytes = 256 * 1024;
  static constexpr size_t kDirectBytes = 64 * 1024;
  explicit Reader(int fd) : fd_(fd), buf_(kBufBytes) {}

  // Fills dst (null: discard) with the next n bytes. 0 or -errno (-ECONNRESET at EOF).
  int read(void* dst, uint64_t n) {
    auto* d = static_cast<uint8_t*>(dst);
    while (n > 0) {
      if (pos_ < end_) {
        size_t k = static_cast<size_t>(std::min<uint64_t>(n, end_ - pos_));
        if (d) {
          std::memcpy(d, buf_.data() + pos_, k);
          d += k;
        }
        pos_ += k;
        n -= k;
        continue;
      }
      int r;
      if (d && n >= kDirectBytes) {
        r = direct(d, n);
      } else {
        // While payloads are large, read no more than what is asked for (a header, a trailer):
        // a full buffer would pull the next large payload through staging.
        r = fill(big_ ? static_cast<size_t>(std::min<uint64_t>(std::max<uint64_t>(n, sizeof(Frame)), buf_.size()))
                      : buf_.size());
      }
      if (r < 0) return r;
    }
    return 0;
  }
  // A write's payload: remembers whether payloads are large (see read()).
  int payload(void* dst, uint64_t n) {
    big_ = n >= kDirectBytes;
    return read(dst, n);
  }
  // Reads and throws away n bytes (a refused write's payload).
  int skip(uint64_t n) { return read(nullptr, n); }

 private:
  static int wait_readable(int fd) {
    pollfd p{fd, POLLIN, 0};
    return ::poll(&p, 1, -1) < 0 && errno != EINTR ? -errno : 0;
  }
  // recvmsg into iov[0..cnt), retried on EINTR / EAGAIN. Bytes received, or -errno
  // (-ECONNRESET at EOF).
  ssize_t receive(iovec* iov, size_t cnt) {
    for (;;) {
      msghdr mh{};
      mh.msg_iov = iov;
      mh.msg_iovlen = cnt;
      ssize_t r = ::recvmsg(fd_, &mh, 0);
      if (r > 0) return r;
      if (r == 0) return -ECONNRESET;
      if (errno == EINTR) continue;
      if (errno != EAGAIN) return -errno;
      int w = wait_readable(fd_);
      if (w < 0) return w;
    }
  }
  int fill(size_t want) {
    pos_ = end_ = 0;
    iovec iov{buf_.data(), want};
    ssize_t r = receive(&iov, 1);
    if (r < 0) return static_cast<int>(r);
    end_ = static_cast<size_t>(r);
    return 0;
  }
  // Receives into d[0, n) and then up to one frame header into the (empty) buffer; advances d
  // and n by what landed in d.
  int direct(uint8_t*& d, uint64_t& n) {
    pos_ = end_ = 0;
    iovec iov[2] = {{d, static_cast<size_t>(std::min<uint64_t>(n, size_t{1} << 30))}, {buf_.data(), sizeof(Frame)}};
    ssize_t r = receive(iov, 2);
    if (r < 0) return static_cast<int>(r);
    size_t got = static_cast<size_t>(r);
    size_t into_d = std::min(got, iov[0].iov_len);
    d += into_d;
    n -= into_d;
    end_ = got - into_d;
    return 0;
  }
  int fd_;
  std::vector<uint8_t> buf_;
  size_t pos_ = 0, end_ = 0;
  bool big_ = false;  // the last payload was received directly
};

// Why a (key, offset, length) write is refused, as -errno; 0 when allowed.
int check_write(const Exposure& e, uint64_t off, uint64_t len) {
  if (!e.region) return -ENOENT;
  if (!e.writable) return -EACCES;
  if (e.region->closed()) return -ENOENT;
  uint64_t size = e.region->size();
  if (off > size || len > size - off) return -ERANGE;
  return 0;
}
}  // namespace

void Agent::set_control_handler(uint32_t channel, ControlHandler h) {
  std::lock_guard<std::mutex> lk(g_handlers_mu);
  handlers()[channel] = std::move(h);
}

Agent::Agent(NetOptions opts, std::function<uint64_t()> request_id)
    : opts_(std::move(opts)), request_id_(std::move(request_id)) {
  if (opts_.lanes.size() > static_cast<size_t>(kMaxLanes))
    throw UsageError("net: at most " + std::to_string(kMaxLanes) + " verbs lanes (distinct ib_sl/roce_tclass pairs), got " +
                     std::to_string(opts_.lanes.size()));
  for (const Lane& l : opts_.lanes)
    if (l.ib_sl > 15) throw UsageError("net: ib_sl must be in [0, 15], got " + std::to_string(l.ib_sl));
  for (const char* k : {"connections", "refused_connections", "bytes_received", "writes_refused", "requests_completed",
                        "requests_failed", "notifications_delivered", "notifications_dropped", "protocol_errors", "regions_mapped"})
    stats_[k] = 0;
  meta_.engine_id = random_id();
  meta_.boot_id = local_boot_id();
  meta_.netns = local_netns();
  meta_.pid = static_cast<uint32_t>(getpid());
  meta_.uid = static_cast<uint32_t>(getuid());
  meta_.hostname = hostname();
  meta_.name = opts_.name.empty() ? "pid" + std::to_string(getpid()) : opts_.name;
  Id128 r = random_id();
  std::memcpy(&next_key_, r.data(), sizeof next_key_);
  next_key_ = (next_key_ & 0x7fffffffu) | 1u;  // random start: keys are not guessable from 0
}

void Agent::set_qos(std::shared_ptr<qos::Gate> gate, int default_class) {
  class_lane_.clear();
  for (auto& c : gate->options().classes) {
    int li = -1;
    for (size_t k = 0; k < opts_.lanes.size(); ++k)
      if (opts_.lanes[k].ib_sl == c.ib_sl && opts_.lanes[k].roce_tclass == c.roce_tclass) li = static_cast<int>(k);
    if (li < 0) throw UsageError("net: traffic class '" + c.name + "' has no verbs lane (NetOptions::lanes)");
    class_lane_.push_back(li);
  }
  if (default_class < 0 || static_cast<size_t>(default_class) >= class_lane_.size())
    throw UsageError("net: default class " + std::to_string(default_class) + " is not a class index");
  gate_ = std::move(gate);
  default_class_ = default_class;
}

int Agent::resolve_class(int qos_class) const {
  if (qos_class == -1) return gate_ ? default_class_ : 0;
  size_t n = gate_ ? class_lane_.size() : 1;
  if (qos_class < 0 || static_cast<size_t>(qos_class) >= n)
    throw UsageError("traffic class index " + std::to_string(qos_class) + " is out of range [0, " + std::to_string(n) + ")");
  return qos_class;
}

Lane Agent::lane(int i) const noexcept {
  if (i >= 0 && static_cast<size_t>(i) < opts_.lanes.size()) return opts_.lanes[static_cast<size_t>(i)];
  Lane l;
  l.ib_sl = static_cast<uint8_t>(i & 15);
  l.roce_tclass = static_cast<uint8_t>((i & 7) << 5);
  return l;
}

Agent::~Agent() { close(); }

void Agent::start() {
  std::lock_guard<std::mutex> lk(mu_);
  if (started_.load()) return;
  if (closed_.load()) throw ClosedError("Engine is closed");
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) throw_sys(errno, "eventfd");

  // tcp: IPv4 or IPv6 literal, "" / "0.0.0.0" / "::" for every interface.
  std::string host = opts_.listen_host;
  sockaddr_storage ss{};
  socklen_t sl = 0;
  int family = AF_INET;
  if (host.empty() || host == "0.0.0.0") {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_ANY);
    a->sin_port = htons(opts_.listen_port);
    sl = sizeof *a;
  } else {
    auto* a4 = reinterpret_cast<sockaddr_in*>(&ss);
    auto* a6 = reinterpret_cast<sockaddr_in6*>(&ss);
    if (inet_pton(AF_INET, host.c_str(), &a4->sin_addr) == 1) {
      a4->sin_family = AF_INET;
      a4->sin_port = htons(opts_.listen_port);
      sl = sizeof *a4;
    } else if (inet_pton(AF_INET6, host.c_str(), &a6->sin6_addr) == 1) {
      family = AF_INET6;
      a6->sin6_family = AF_INET6;
      a6->sin6_port = htons(opts_.listen_port);
      sl = sizeof *a6;
    } else {
      throw UsageError("listen_host must be an IPv4 or IPv6 address literal, got '" + host + "'");
    }
  }
  tcp_fd_ = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (tcp_fd_ < 0) throw_sys(errno, "socket(tcp)");
  int one = 1;
  setsockopt(tcp_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(tcp_fd_, reinterpret_cast<sockaddr*>(&ss), sl) != 0)
    throw_sys(errno, "bind(" + host + ":" + std::to_string(opts_.listen_port) + ")");
  if (::listen(tcp_fd_, 256) != 0) throw_sys(errno, "listen(tcp)");
  sockaddr_storage bound{};
  socklen_t bl = sizeof bound;
  getsockname(tcp_fd_, reinterpret_cast<sockaddr*>(&bound), &bl);
  uint16_t port = ntohs(family == AF_INET ? reinterpret_cast<sockaddr_in*>(&bound)->sin_port
                                          : reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
  bool wildcard = host.empty() || host == "0.0.0.0";
  if (wildcard) {
    // Advertise every IPv4 address of this host, non-loopback first.
    ifaddrs* ifa = nullptr;
    std::vector<Endpoint> loop;
    if (getifaddrs(&ifa) == 0) {
      for (ifaddrs* i = ifa; i; i = i->ifa_next) {
        if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET) continue;
        Endpoint e;
        e.family = AF_INET;
        e.port = port;
        std::memcpy(e.addr.data(), &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, 4);
        (e.addr[0] == 127 ? loop : meta_.tcp).push_back(e);
      }
      freeifaddrs(ifa);
    }
    for (auto& e : loop) meta_.tcp.push_back(e);
    if (meta_.tcp.size() > 16) meta_.tcp.resize(16);
  } else {
    Endpoint e;
    e.family = family;
    e.port = port;
    if (family == AF_INET)
      std::memcpy(e.addr.data(), &reinterpret_cast<sockaddr_in*>(&ss)->sin_addr, 4);
    else
      std::memcpy(e.addr.data(), &reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr, 16);
    meta_.tcp.push_back(e);
  }

  if (opts_.listen_unix) {
    // Abstract socket: no file to leak when the process dies; access is checked per
    // connection with SO_PEERCRED (same uid only).
    std::string name = "dpmove-" + std::to_string(getuid()) + "-" + hex(meta_.engine_id);
    unix_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (unix_fd_ < 0) throw_sys(errno, "socket(unix)");
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::memcpy(a.sun_path + 1, name.data(), name.size());
    socklen_t al = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    if (::bind(unix_fd_, reinterpret_cast<sockaddr*>(&a), al) != 0) throw_sys(errno, "bind(unix @" + name + ")");
    if (::listen(unix_fd_, 256) != 0) throw_sys(errno, "listen(unix)");
    meta_.unix_name = name;
  }
  // RDMA ports this engine can use: a peer with ports of its own then picks verbs on "auto".
  meta_.verbs = verbs_local_ports();
  started_.store(true);
  acceptor_ = std::thread([this] { accept_loop(); });
}

void Agent::close() {
  if (closed_.exchange(true)) return;
  std::vector<std::shared_ptr<Peer>> peers;
  std::vector<std::shared_ptr<Conn>> conns;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& w : peers_)
      if (auto p = w.lock()) peers.push_back(p);
    peers_.clear();
  }
  for (auto& p : peers) p->close();
  if (wake_fd_ >= 0) {
    uint64_t one = 1;
    (void)!::write(wake_fd_, &one, sizeof one);
  }
  if (acceptor_.joinable()) acceptor_.join();
  std::map<uint32_t, Exposure> exposed;  // destroyed outside mu_ (see unexpose)
  {
    std::lock_guard<std::mutex> lk(mu_);
    conns.swap(conns_);
    exposed.swap(exposed_);
  }
  // Unblocks every connection thread (they sit in recv); then join them.
  for (auto& c : conns) ::shutdown(c->fd, SHUT_RDWR);
  for (auto& c : conns)
    if (c->thread.joinable()) c->thread.join();
  for (int* fd : {&tcp_fd_, &unix_fd_, &wake_fd_})
    if (*fd >= 0) {
      ::close(*fd);
      *fd = -1;
    }
  std::lock_guard<std::mutex> lk(nmu_);
  ncv_.notify_all();
}

void Agent::accept_loop() {
  for (;;) {
    pollfd p[3] = {{wake_fd_, POLLIN, 0}, {tcp_fd_, POLLIN, 0}, {unix_fd_, POLLIN, 0}};
    int n = ::poll(p, unix_fd_ >= 0 ? 3 : 2, 1000);
    if (closed_.load()) return;
    if (n < 0 && errno != EINTR) return;
    {
      // Reap connections whose thread ended.
      std::lock_guard<std::mutex> lk(mu_);
      for (auto it = conns_.begin(); it != conns_.end();) {
        if ((*it)->done.load()) {
          if ((*it)->thread.joinable()) (*it)->thread.join();
          it = conns_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (int i = 1; i < 3; ++i) {
      if (i == 2 && unix_fd_ < 0) break;
      if (!(p[i].revents & POLLIN)) continue;
      int fd = ::accept4(p[i].fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      auto c = std::make_shared<Conn>();
      c->fd = fd;
      c->is_unix = i == 2;
      if (c->is_unix) {
        ucred cred{};
        socklen_t cl = sizeof cred;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) != 0 || cred.uid != getuid()) {
          send_error(fd, EPERM, "shm connections are accepted from the same user only");
          count("refused_connections");
          continue;  // ~Conn closes fd
        }
      } else {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      }
      std::lock_guard<std::mutex> lk(mu_);
      if (closed_.load()) return;
      if (conns_.size() >= kMaxConnections) {
        send_error(fd, EMFILE, "too many connections to this engine (" + std::to_string(kMaxConnections) + ")");
        count("refused_connections");
        continue;
      }
      try {
        c->thread = std::thread([this, c] {
          serve(c);
          ::shutdown(c->fd, SHUT_RDWR);
          c->done.store(true);
        });
      } catch (const std::system_error&) {
        send_error(fd, EAGAIN, "cannot start a thread for this connection");
        count("refused_connections");
        continue;
      }
      conns_.push_back(c);
    }
  }
}

std::shared_ptr<Agent::Session> Agent::session(uint64_t id, const HelloBody& body, uint32_t streams) {
  std::lock_guard<std::mutex> lk(mu_);
  for (auto it = sessions_.begin(); it != sessions_.end();) it = it->second.expired() ? sessions_.erase(it) : std::next(it);
  auto& w = sessions_[id];
  if (auto s = w.lock()) {
    if (s->sender != body.client_engine) return nullptr;  // a session id reused by someone else
    return s;
  }
  auto s = std::make_shared<Session>();
  s->id = id;
  s->sender = body.client_engine;
  s->peer = std::string(body.client_name, strnlen(body.client_name, sizeof body.client_name));
  s->streams = streams;
  w = s;
  return s;
}

void Agent::serve(std::shared_ptr<Conn> c) {
  int64_t dl = now_ns() + int64_t{5} * 1000000000;  // a connection must say HELLO within 5 s
  Frame f;
  if (recv_frame(c->fd, &f, dl) < 0 || f.type != static_cast<uint16_t>(FrameType::kHello) || f.length != sizeof(HelloBody)) {
    count("refused_connections");
    send_error(c->fd, EPROTO, "expected a dpmove HELLO");
    return;
  }
  HelloBody body;
  if (recv_all(c->fd, &body, sizeof body, dl) < 0) return;
  if (body.server_engine != meta_.engine_id) {
    count("refused_connections");
    send_error(c->fd, ESTALE,
               "this listener belongs to engine " + hex(meta_.engine_id).substr(0, 8) + " (" + meta_.name +
                   "), the metadata names engine " + hex(body.server_engine).substr(0, 8) +
                   ": the peer restarted; connect with its new metadata");
    return;
  }
  auto ch = static_cast<Channel>(f.key);
  bool unix_only = ch == Channel::kShmData || ch == Channel::kControl;
  if (unix_only && !c->is_unix) {
    send_error(c->fd, EPROTO, "shm channels need the unix socket");
    return;
  }
  ControlHandler handler;
  if (ch != Channel::kTcpData && ch != Channel::kShmData && ch != Channel::kControl) {
    std::lock_guard<std::mutex> lk(g_handlers_mu);
    auto it = handlers().find(f.key);
    if (it != handlers().end()) handler = it->second;
    if (!handler) {
      send_error(c->fd, EPROTONOSUPPORT, "channel " + std::to_string(f.key) + " is not served by this engine");
      return;
    }
  }
  // Up to 16 streams a writer asks for, plus its urgent lane (ConnectOptions::urgent_lane).
  if (f.offset < 1 || f.offset > 17 || f.aux >= f.offset) {
    send_error(c->fd, EPROTO, "bad stream numbering");
    return;
  }
  Frame ok;
  ok.type = static_cast<uint16_t>(FrameType::kHelloOk);
  if (send_frame(c->fd, ok, nullptr, 0, dl) < 0) return;
  count("connections");
  if (handler) {
    handler(*this, c->fd, body, f.req);
  } else if (ch == Channel::kControl) {
    serve_map(*c);
  } else {
    serve_data(c, f, body);
  }
}

void Agent::serve_data(const std::shared_ptr<Conn>& self, const Frame& hello, const HelloBody& body) {
  Conn& c = *self;
  auto s = session(hello.req, body, static_cast<uint32_t>(hello.offset));
  if (!s) {
    send_error(c.fd, EPROTO, "session id in use by another engine");
    return;
  }
  const bool tcp = static_cast<Channel>(hello.key) == Channel::kTcpData;
  bool open = false;  // inside a request on this stream
  uint64_t cur = 0, count_in = 0;
  std::vector<AckFailure> failures;
  std::vector<uint8_t> trailer;
  std::string violation;
  int64_t bytes_in = 0;
  Reader in(c.fd);
  Exposure cached{nullptr, 0, false};  // the last key written, while expo_gen_ is unchanged
  uint64_t cached_gen = 0;
  for (;;) {
    Frame f;
    int r = in.read(&f, sizeof f);
    if (r < 0) break;
    if (f.magic != kFrameMagic) {
      violation = "bad frame magic";
      break;
    }
    auto type = static_cast<FrameType>(f.type);
    if (type == FrameType::kWrite && tcp) {
      if (open && f.req != cur) { violation = "write of request " + std::to_string(f.req) + " inside request " + std::to_string(cur); break; }
      if (!open) { open = true; cur = f.req; count_in = 0; failures.clear(); }
      if (!cached.region || cached.key != f.key || cached_gen != expo_gen_.load()) {
        cached_gen = expo_gen_.load();
        cached = find(f.key);
      }
      const Exposure& e = cached;
      int st = check_write(e, f.offset, f.length);
      if (st == 0) {
        // Payload lands straight in the exposed region; e.region keeps it alive meanwhile.
        r = in.payload(e.region->data() + f.offset, f.length);
        bytes_in += static_cast<int64_t>(f.length);
      } else {
        r = in.skip(f.length);
        failures.push_back({f.aux, st});
        count("writes_refused");
      }
      if (r < 0) break;
      ++count_in;
    } else if (type == FrameType::kEnd) {
      if (open && f.req != cur) { violation = "end of request " + std::to_string(f.req) + " inside request " + std::to_string(cur); break; }
      if (!open) failures.clear(), count_in = 0;
      if (f.length > kMaxTrailer || f.extra > kMaxNotifyBytes || f.extra > f.length) { violation = "oversized trailer"; break; }
      bool extents = f.flags & kEndExtents;
      if (extents == tcp) { violation = "extents on the wrong channel"; break; }
      if (extents && f.length != f.extra + uint64_t{f.aux} * sizeof(Extent)) { violation = "extent count does not match trailer"; break; }
      if (!extents && (f.length != f.extra || f.aux != count_in)) { violation = "entry count does not match the writes received"; break; }
      trailer.resize(static_cast<size_t>(f.length));
      if (f.length && in.read(trailer.data(), trailer.size()) < 0) break;
      if (extents) {
        // shm: the sender already copied; check each extent it claims, so a sender that wrote
        // outside what we exposed never gets a notification delivered.
        const uint8_t* p = trailer.data() + f.extra;
        Exposure e{nullptr, 0, false};
        for (uint32_t i = 0; i < f.aux; ++i) {
          Extent x;
          std::memcpy(&x, p + size_t{i} * sizeof x, sizeof x);
          if (!e.region || e.key != x.key) e = find(x.key);
          int st = check_write(e, x.offset, x.length);
          if (st) {
            failures.push_back({x.entry, st});
            count("writes_refused");
          } else {
            bytes_in += static_cast<int64_t>(x.length);
          }
        }
      }
      count("bytes_received", bytes_in);
      bytes_in = 0;
      std::vector<uint8_t> notify;
      if (f.flags & kEndNotify) notify.assign(trailer.begin(), trailer.begin() + static_cast<long>(f.extra));
      if (!end_request(*s, self, f, std::move(failures), std::move(notify))) {
        violation = "END of request " + std::to_string(f.req) + " exceeds the session's streams or pending limits";
        break;
      }
      failures.clear();
      open = false;
      count_in = 0;
    } else {
      violation = "unexpected frame type " + std::to_string(f.type);
      break;
    }
  }
  count("bytes_received", bytes_in);
  if (!violation.empty()) {
    count("protocol_errors");
    std::lock_guard<std::mutex> lk(c.wmu);  // another stream's thread may be sending an ACK here
    send_error(c.fd, EPROTO, "protocol violation: " + violation);
  }
  // A stream that ends leaves the session's open requests incomplete for good: drop them, so
  // none of their notifications is ever delivered.
  std::lock_guard<std::mutex> lk(s->mu);
  s->dead = true;
  s->pending.clear();
}

bool Agent::end_request(Session& s, const std::shared_ptr<Conn>& c, const Frame& end, std::vector<AckFailure> failures,
                        std::vector<uint8_t> notify) {
  Session::Pending done;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    if (s.dead) return true;
    // What a sender may keep open is bounded: a request spans 1..streams streams, and a
    // session holds at most kMaxPending unfinished requests and kMaxPendingNotify bytes of
    // their notifications. Anything else is a protocol violation that closes the connection.
    if (end.offset == 0 || end.offset > s.streams) return false;
    if (!s.pending.count(end.req) && s.pending.size() >= kMaxPending) return false;
    if ((end.flags & kEndNotify) && s.notify_bytes + notify.size() > kMaxPendingNotify) return false;
    auto& p = s.pending[end.req];
    if (p.ended == 0) {
      p.nstreams = static_cast<uint32_t>(std::min<uint64_t>(end.offset, UINT32_MAX));
      p.total = end.key;
    }
    ++p.ended;
    p.seen += end.aux;
    p.failures.insert(p.failures.end(), failures.begin(), failures.end());
    if (end.offset != p.nstreams || end.key != p.total || p.nstreams == 0 || p.nstreams > s.streams)
      p.failures.push_back({0, -EPROTO});
    if (end.flags & kEndPrimary) {
      p.primary = c;
      if (p.has_notify) s.notify_bytes -= p.notify.size();  // a second primary END: replaced
      p.has_notify = end.flags & kEndNotify;
      p.notify = std::move(notify);
      s.notify_bytes += p.notify.size();
    }
    if (p.ended < p.nstreams) return true;
    done = std::move(p);
    s.notify_bytes -= done.notify.size();
    s.pending.erase(end.req);
  }
  bool complete = done.failures.empty() && done.seen == done.total;
  bool delivered = false;
  if (complete && done.has_notify) {
    Notification n;
    n.peer = s.peer;
    n.sender = s.sender;
    n.data = std::move(done.notify);
    n.request = end.req;
    delivered = deliver(std::move(n));
    if (!delivered) {
      // The application is not taking notifications: the data landed, but the request fails
      // (ENOBUFS) rather than losing its notification silently.
      done.failures.push_back({0, -ENOBUFS});
      complete = false;
    }
  }
  count(complete ? "requests_completed" : "requests_failed");
  auto primary = done.primary.lock();
  if (!primary) return true;
  Frame ack;
  ack.type = static_cast<uint16_t>(FrameType::kAck);
  ack.req = end.req;
  ack.aux = static_cast<uint32_t>(done.failures.size());
  ack.length = done.failures.size() * sizeof(AckFailure);
  ack.extra = delivered ? 1 : 0;
  std::lock_guard<std::mutex> lk(primary->wmu);
  if (send_frame(primary->fd, ack, done.failures.data(), static_cast<size_t>(ack.length), now_ns() + int64_t{10} * 1000000000) < 0)
    ::shutdown(primary->fd, SHUT_RDWR);
  return true;
}

void Agent::serve_map(Conn& c) {
  for (;;) {
    Frame f;
    if (recv_frame(c.fd, &f, INT64_MAX) < 0) return;
    if (f.type != static_cast<uint16_t>(FrameType::kMap) || f.length != 0) {
      count("protocol_errors");
      send_error(c.fd, EPROTO, "protocol violation: expected MAP on the control channel");
      return;
    }
    Exposure e = find(f.key);
    Frame ok;
    ok.type = static_cast<uint16_t>(FrameType::kMapOk);
    ok.key = f.key;
    int fd = -1;
    if (!e.region) {
      ok.aux = ENOENT;
    } else if (!e.writable) {
      // A mapping cannot be made read-only for writes we would refuse only afterwards: an shm
      // writer gets no access at all to a region exposed read-only.
      ok.aux = EACCES;
    } else if (e.region->memory()->memfd() < 0) {
      ok.aux = EOPNOTSUPP;  // wrapped Python buffer: no memfd to share
    } else {
      fd = e.region->memory()->memfd();
      ok.offset = e.region->offset_in_memory();
      ok.length = e.region->size();
      ok.extra = e.region->memory()->memfd_size();
      ok.flags = e.writable ? kHandleWritable : 0;
    }
    msghdr mh{};
    iovec iov{&ok, sizeof ok};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    alignas(cmsghdr) char ctl[CMSG_SPACE(sizeof(int))] = {0};
    if (fd >= 0) {
      mh.msg_control = ctl;
      mh.msg_controllen = sizeof ctl;
      cmsghdr* cm = CMSG_FIRSTHDR(&mh);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    }
    std::lock_guard<std::mutex> lk(c.wmu);
    // The frame is 48 bytes: a blocking-size sendmsg on a unix stream socket sends it whole.
    if (::sendmsg(c.fd, &mh, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof ok)) return;
    if (fd >= 0) count("regions_mapped");
  }
}

RemoteHandle Agent::expose(const std::shared_ptr<Region>& r, bool writable) {
  r->check_open();
  if (writable && !r->writable())
    throw UsageError("expose(writable=True): the region is read-only (a read-only buffer); pass writable=False");
  std::lock_guard<std::mutex> lk(mu_);
  if (closed_.load()) throw ClosedError("Engine is closed");
  uint32_t key = next_key_++;
  if (next_key_ == 0) next_key_ = 1;
  exposed_[key] = Exposure{r, key, writable};
  RemoteHandle h;
  h.engine = meta_.engine_id;
  h.key = key;
  h.size = r->size();
  h.flags = static_cast<uint16_t>((writable ? kHandleWritable : 0) | (r->memory()->memfd() >= 0 ? kHandleShm : 0));
  return h;
}

bool Agent::unexpose(uint32_t key) {
  // The Exposure is destroyed after the lock is released: dropping the last reference to a
  // wrapped Python buffer takes the GIL, which a thread waiting for mu_ may hold.
  Exposure gone{nullptr, key, false};
  std::lock_guard<std::mutex> lk(mu_);
  auto it = exposed_.find(key);
  if (it == exposed_.end()) return false;
  gone = std::move(it->second);
  exposed_.erase(it);
  expo_gen_.fetch_add(1);
  return true;
}

Exposure Agent::find(uint32_t key) const {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = exposed_.find(key);
  return it == exposed_.end() ? Exposure{nullptr, key, false} : it->second;
}

std::vector<RemoteHandle> Agent::exposures() const {
  std::vector<RemoteHandle> out;
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& kv : exposed_) {
    RemoteHandle h;
    h.engine = meta_.engine_id;
    h.key = kv.first;
    h.size = kv.second.region->size();
    h.flags = static_cast<uint16_t>((kv.second.writable ? kHandleWritable : 0) |
                                    (kv.second.region->memory()->memfd() >= 0 ? kHandleShm : 0));
    out.push_back(h);
  }
  return out;
}

bool Agent::next_notification(Notification* out, int64_t timeout_ns) {
  std::unique_lock<std::mutex> lk(nmu_);
  int64_t until = timeout_ns == INT64_MAX ? INT64_MAX : now_ns() + timeout_ns;
  for (;;) {
    if (!notes_.empty()) {
      *out = std::move(notes_.front());
      notes_.pop_front();
      note_bytes_ -= out->data.size();
      return true;
    }
    if (closed_.load()) return false;
    int64_t now = now_ns();
    if (now >= until) return false;
    ncv_.wait_for(lk, std::chrono::nanoseconds(std::min<int64_t>(until - now, 100000000)));
  }
}

bool Agent::deliver(Notification n) {
  {
    std::lock_guard<std::mutex> lk(nmu_);
    if (notes_.size() >= kMaxNotifications || note_bytes_ + n.data.size() > kMaxNotificationBytes) {
      count("notifications_dropped");
      return false;
    }
    note_bytes_ += n.data.size();
    notes_.push_back(std::move(n));
  }
  ncv_.notify_one();
  count("notifications_delivered");
  return true;
}

size_t Agent::pending_notifications() const {
  std::lock_guard<std::mutex> lk(nmu_);
  return notes_.size();
}

std::shared_ptr<Peer> Agent::connect(const Metadata& m, const ConnectOptions& o) {
  if (closed_.load()) throw ClosedError("Engine is closed");
  ConnectOptions co = o;
  co.urgent_lane = gate_ && gate_->options().enabled;
  auto p = std::make_shared<Peer>(shared_from_this(), m, co);
  p->connect();
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!closed_.load()) {
      for (auto it = peers_.begin(); it != peers_.end();) it = it->expired() ? peers_.erase(it) : std::next(it);
      peers_.push_back(p);
      return p;
    }
  }
  p->close();  // close() ran while we connected: it could not see this peer
  throw ClosedError("Engine was closed while connecting");
}

std::map<std::string, int64_t> Agent::stats() const {
  std::lock_guard<std::mutex> lk(smu_);
  return stats_;
}

void Agent::count(const char* what, int64_t n) {
  std::lock_guard<std::mutex> lk(smu_);
  stats_[what] += n;
}

}  // namespace net
}  // namespace dpmove
