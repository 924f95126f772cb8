// Blocking socket helpers with absolute deadlines, used for connection set-up, the receiver's
// per-connection threads and synchronous control exchanges.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include "dpmove/net.h"
#include "dpmove/status.h"

namespace dpmove {
namespace net {

namespace {
// Waits for `events` on fd until the deadline. 0 ready, -ETIMEDOUT, -errno.
int wait_fd(int fd, short events, int64_t deadline_ns) {
  for (;;) {
    int timeout_ms = -1;
    if (deadline_ns != INT64_MAX) {
      int64_t left = deadline_ns - now_ns();
      if (left <= 0) return -ETIMEDOUT;
      timeout_ms = static_cast<int>(std::min<int64_t>((left + 999999) / 1000000, INT_MAX));
    }
    pollfd p{fd, events, 0};
    int r = ::poll(&p, 1, timeout_ms);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (r == 0) continue;  // re-evaluates the deadline
    if (p.revents & POLLNVAL) return -EBADF;
    return 0;  // readable/writable, or an error the next call reports
  }
}
}  // namespace

int send_all(int fd, const void* p, size_t n, int64_t deadline_ns) {
  const auto* b = static_cast<const uint8_t*>(p);
  while (n > 0) {
    ssize_t r = ::send(fd, b, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r > 0) {
      b += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno != EAGAIN) return -errno;
    int w = wait_fd(fd, POLLOUT, deadline_ns);
    if (w < 0) return w;
  }
  return 0;
}

int recv_all(int fd, void* p, size_t n, int64_t deadline_ns) {
  auto* b = static_cast<uint8_t*>(p);
  while (n > 0) {
    ssize_t r = ::recv(fd, b, n, MSG_DONTWAIT);
    if (r > 0) {
      b += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r == 0) return -ECONNRESET;
    if (errno == EINTR) continue;
    if (errno != EAGAIN) return -errno;
    int w = wait_fd(fd, POLLIN, deadline_ns);
    if (w < 0) return w;
  }
  return 0;
}

int send_frame(int fd, const Frame& f, const void* trailer, size_t len, int64_t deadline_ns) {
  int r = send_all(fd, &f, sizeof f, deadline_ns);
  if (r == 0 && len) r = send_all(fd, trailer, len, deadline_ns);
  return r;
}

int recv_frame(int fd, Frame* f, int64_t deadline_ns) {
  int r = recv_all(fd, f, sizeof *f, deadline_ns);
  if (r < 0) return r;
  if (f->magic != kFrameMagic) return -EPROTO;
  return 0;
}

void send_error(int fd, int err, const std::string& msg) {
  Frame f;
  f.type = static_cast<uint16_t>(FrameType::kError);
  f.aux = static_cast<uint32_t>(err);
  std::string m = msg.substr(0, 1024);
  f.length = m.size();
  send_frame(fd, f, m.data(), m.size(), now_ns() + 1000000000);
}

namespace {
int finish_connect(int fd, int64_t deadline_ns) {
  int w = wait_fd(fd, POLLOUT, deadline_ns);
  if (w < 0) return w;
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) return -errno;
  return err ? -err : 0;
}
}  // namespace

int dial_tcp(const Endpoint& e, int64_t deadline_ns) {
  int fd = ::socket(e.family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -errno;
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  sockaddr_storage ss{};
  socklen_t sl;
  if (e.family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(e.port);
    std::memcpy(&a->sin6_addr, e.addr.data(), 16);
    sl = sizeof *a;
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_port = htons(e.port);
    std::memcpy(&a->sin_addr, e.addr.data(), 4);
    sl = sizeof *a;
  }
  int r = ::connect(fd, reinterpret_cast<sockaddr*>(&ss), sl);
  if (r != 0 && errno != EINPROGRESS) {
    int err = errno;
    ::close(fd);
    return -err;
  }
  if (r != 0) {
    r = finish_connect(fd, deadline_ns);
    if (r < 0) {
      ::close(fd);
      return r;
    }
  }
  return fd;
}

int dial_unix(const std::string& name, int64_t deadline_ns) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -errno;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  size_t n = std::min(name.size(), sizeof(a.sun_path) - 1);
  std::memcpy(a.sun_path + 1, name.data(), n);  // abstract: sun_path[0] == 0
  socklen_t sl = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
  int r = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sl);
  if (r != 0 && errno != EINPROGRESS && errno != EAGAIN) {
    int err = errno;
    ::close(fd);
    return -err;
  }
  if (r != 0) {
    r = finish_connect(fd, deadline_ns);
    if (r < 0) {
      ::close(fd);
      return r;
    }
  }
  return fd;
}

int hello(int fd, Channel ch, uint32_t stream, uint64_t session, uint32_t streams, const Id128& server,
          const Id128& client, const std::string& client_name, int64_t deadline_ns, std::string* why) {
  Frame f;
  f.type = static_cast<uint16_t>(FrameType::kHello);
  f.key = static_cast<uint32_t>(ch);
  f.aux = stream;
  f.req = session;
  f.offset = streams;
  HelloBody b{};
  b.server_engine = server;
  b.client_engine = client;
  std::strncpy(b.client_name, client_name.c_str(), sizeof b.client_name - 1);
  f.length = sizeof b;
  int r = send_frame(fd, f, &b, sizeof b, deadline_ns);
  if (r < 0) return r;
  Frame reply;
  r = recv_frame(fd, &reply, deadline_ns);
  if (r < 0) return r;
  if (reply.type == static_cast<uint16_t>(FrameType::kHelloOk)) return 0;
  if (reply.type == static_cast<uint16_t>(FrameType::kError)) {
    std::string msg(std::min<uint64_t>(reply.length, 1024), '\0');
    if (!msg.empty() && recv_all(fd, msg.data(), msg.size(), deadline_ns) < 0) msg.clear();
    if (why) *why = msg;
    int err = static_cast<int>(reply.aux);
    return -(err > 0 && err < 4096 ? err : EPROTO);
  }
  return -EPROTO;
}

}  // namespace net
}  // namespace dpmove
