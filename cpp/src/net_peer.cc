// Sender side: transport choice, validation of put requests, reconnect.
#include <cstring>
#include <unistd.h>

#include <cerrno>
#include <climits>

#include "dpmove/net.h"
#include "dpmove/status.h"

namespace dpmove {
namespace net {

#if !DPMOVE_HAVE_VERBS
std::shared_ptr<Transport> make_verbs_transport(Agent&, const Metadata&, const ConnectOptions&, const std::string&) {
  throw UnsupportedError(EPROTONOSUPPORT,
                         "transport 'verbs': dpmove was built without rdma-core headers (Debian: libibverbs-dev); rebuild "
                         "with them to use RDMA");
}
bool verbs_usable(std::string* why) {
  if (why) *why = "dpmove was built without rdma-core headers (libibverbs-dev)";
  return false;
}
#endif

Peer::Peer(std::shared_ptr<Agent> local, Metadata remote, ConnectOptions opts)
    : local_(std::move(local)), remote_(std::move(remote)), opts_(std::move(opts)) {
  if (opts_.transport != "auto" && opts_.transport != "shm" && opts_.transport != "tcp" && opts_.transport != "verbs")
    throw UsageError("transport must be 'auto', 'shm', 'tcp' or 'verbs', got '" + opts_.transport + "'");
  if (opts_.streams < 1 || opts_.streams > 16) throw UsageError("streams must be in [1, 16], got " + std::to_string(opts_.streams));
  if (opts_.chain < 1 || opts_.chain > 1024) throw UsageError("chain must be in [1, 1024], got " + std::to_string(opts_.chain));
  if (opts_.signal_every < 1 || opts_.signal_every > 1024)
    throw UsageError("signal_every must be in [1, 1024], got " + std::to_string(opts_.signal_every));
  if (opts_.timeout_ns <= 0) throw UsageError("connect timeout must be > 0");
}

Peer::~Peer() { close(); }

std::string Peer::name() const { return "peer " + remote_.describe(); }

void Peer::connect() {
  // Dialing and shutting down the old transport (which joins its threads) happen outside mu_:
  // mu_ guards only the pointer, so broken(), stats(), put() never wait for the network.
  // connect_mu_ serialises connects; it is only ever taken without the GIL.
  std::lock_guard<std::mutex> ck(connect_mu_);
  std::shared_ptr<Transport> old;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (closed_.load()) throw ClosedError("Peer is closed");
    old.swap(transport_);
  }
  if (local_->closed()) throw ClosedError("Engine is closed");
  if (old) old->shutdown(ECONNABORTED, "reconnecting");
  old.reset();
  // shm needs the same kernel, the same network namespace (abstract unix sockets live in one)
  // and the same user (the receiver accepts only its own uid).
  bool same_host = remote_.boot_id == local_boot_id() && remote_.netns == local_netns() && !remote_.unix_name.empty() &&
                   remote_.uid == static_cast<uint32_t>(getuid());
  std::string t = opts_.transport;
  std::string why_not_verbs;
  if (t == "auto") {
    if (same_host)
      t = "shm";
    else if (!remote_.verbs.empty() && verbs_usable(&why_not_verbs))
      t = "verbs";
    else
      t = "tcp";
  }
  if (t == "shm" && !same_host)
    throw UnsupportedError(EXDEV, "transport 'shm' needs the peer on this host, in this network namespace and run by this user; " +
                                      name() + " is not (use 'tcp' or 'auto')");
  if ((t == "tcp" || t == "verbs") && remote_.tcp.empty())
    throw UnsupportedError(EDESTADDRREQ, name() + " advertises no tcp endpoint");
  std::string pname = name();
  std::shared_ptr<Transport> fresh;
  if (t == "shm")
    fresh = make_shm_transport(*local_, remote_, opts_, pname);
  else if (t == "tcp")
    fresh = make_tcp_transport(*local_, remote_, opts_, pname);
  else
    fresh = make_verbs_transport(*local_, remote_, opts_, pname);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (!closed_.load()) {
      transport_ = fresh;
      chosen_ = t;
      return;
    }
  }
  fresh->shutdown(ECONNABORTED, "the peer was closed while connecting");
  throw ClosedError("Peer was closed while connecting");
}

const char* Peer::transport_name() const {
  std::lock_guard<std::mutex> lk(mu_);
  return transport_ ? transport_->name() : "none";
}

std::string Peer::broken() const {
  std::lock_guard<std::mutex> lk(mu_);
  if (closed_.load()) return "closed";
  return transport_ ? transport_->broken() : "not connected";
}

bool Peer::prepared(const RemoteHandle& dst) const {
  std::lock_guard<std::mutex> lk(mu_);
  return !transport_ || transport_->prepared(dst);
}

std::map<std::string, int64_t> Peer::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return transport_ ? transport_->stats() : std::map<std::string, int64_t>{};
}

void Peer::close() {
  std::shared_ptr<Transport> t;
  {
    std::lock_guard<std::mutex> lk(mu_);
    closed_.store(true);
    t.swap(transport_);
  }
  if (t) t->shutdown(ECONNABORTED, "the peer was closed locally");
}

std::shared_ptr<Request> Peer::put(const std::shared_ptr<Region>& src, const RemoteHandle& dst, const IoEntry* e, size_t n,
                                   const uint8_t* notify, size_t notify_len, bool has_notify, int64_t timeout_ns,
                                   bool timing, int qos_class) {
  if (closed_.load()) throw ClosedError("Peer is closed");
  if (local_->closed()) throw ClosedError("Engine is closed");
  src->check_open();
  if (dst.engine != remote_.engine_id)
    throw UsageError("the handle names region " + std::to_string(dst.key) + " of engine " + hex(dst.engine).substr(0, 8) +
                     ", but this peer is engine " + hex(remote_.engine_id).substr(0, 8) + " (" + remote_.name +
                     "); a handle from before the peer restarted is stale: get a new one from it");
  if (!(dst.flags & kHandleWritable)) throw UsageError("region " + std::to_string(dst.key) + " of " + name() + " was exposed read-only");
  if (notify_len > kMaxNotifyBytes)
    throw UsageError("notify is " + std::to_string(notify_len) + " bytes, at most " + std::to_string(kMaxNotifyBytes) + " allowed");
  if (n > (size_t{1} << 20)) throw UsageError("at most 1048576 entries per request, got " + std::to_string(n));
  const int cls = local_->resolve_class(qos_class);
  const uint64_t lsize = src->size();
  for (size_t i = 0; i < n; ++i) {
    const IoEntry& x = e[i];
    auto where = [&] {
      return "entry " + std::to_string(i) + " (remote_offset=" + std::to_string(x.file_offset) +
             ", local_offset=" + std::to_string(x.region_offset) + ", length=" + std::to_string(x.length) + ")";
    };
    if (x.file_offset < 0 || x.region_offset < 0 || x.length < 0) throw UsageError(where() + ": offsets and length must be >= 0");
    if (static_cast<uint64_t>(x.region_offset) > lsize || static_cast<uint64_t>(x.length) > lsize - static_cast<uint64_t>(x.region_offset))
      throw UsageError(where() + ": does not fit in the local region of " + std::to_string(lsize) + " bytes");
    if (static_cast<uint64_t>(x.file_offset) > dst.size || static_cast<uint64_t>(x.length) > dst.size - static_cast<uint64_t>(x.file_offset))
      throw UsageError(where() + ": outside remote region " + std::to_string(dst.key) + " of " + std::to_string(dst.size) +
                       " bytes; nothing was sent");
  }
  std::shared_ptr<Transport> t;
  {
    std::lock_guard<std::mutex> lk(mu_);
    t = transport_;
  }
  if (!t) throw SysError(ENOTCONN, name() + " is not connected");
  // shm and tcp read the source with the CPU; only verbs can take device memory (the NIC
  // reads it through GPUDirect RDMA).
  if (src->memory()->is_device() && std::strcmp(t->name(), "verbs") != 0)
    throw UsageError(name() + ": the source region is device memory, which the " + t->name() +
                     " transport cannot read; use a verbs connection or copy it to host memory first");
  std::string why = t->broken();
  if (!why.empty())
    throw SysError(ENOTCONN, name() + " is disconnected (" + why + "); call reconnect(), or connect() with its new metadata if it restarted");
  t->prepare(dst);
  int64_t now = now_ns();
  int64_t deadline = timeout_ns == INT64_MAX ? INT64_MAX : (timeout_ns > INT64_MAX - now ? INT64_MAX : now + timeout_ns);
  auto req = std::make_shared<Request>(local_->next_request_id(), OpKind::kPut, nullptr, src, std::vector<IoEntry>(e, e + n),
                                       deadline, timing, name() + " region " + std::to_string(dst.key));
  std::weak_ptr<Transport> wt = t;
  req->set_kick([wt] {
    if (auto tt = wt.lock()) tt->kick();
  });
  auto op = std::make_shared<PutOp>();
  op->req = req;
  op->dst = dst;
  if (has_notify) op->notify.assign(notify, notify + notify_len);
  op->has_notify = has_notify;
  op->via = t;
  const auto& gate = local_->gate();
  if (!gate) {
    dispatch(req, 0, n, op);
    return req;
  }
  op->lane = local_->class_lane(cls);
  op->urgent = gate->options().enabled && gate->top(cls);  // QoS off: one FIFO, no reserved stream
  gate->submit(req, cls, shared_from_this(), op, true);
  return req;
}

void Peer::dispatch(const std::shared_ptr<Request>& req, size_t, size_t, const std::shared_ptr<void>& payload) {
  auto op = std::static_pointer_cast<PutOp>(payload);
  std::shared_ptr<Transport> t = op->via.lock();
  if (!t) {  // the connection was replaced and is gone: as if it had failed the put
    req->set_detail(name() + ": the connection this write was accepted on was closed before its turn");
    for (size_t i = 0; i < req->size(); ++i)
      if (req->start(i)) req->finish(i, -ECONNABORTED, 0);
    return;
  }
  // A broken or shut transport fails the op itself, with its own error.
  std::lock_guard<std::mutex> lk(post_mu_);
  op->seq = ++seq_;
  t->post(op);
}

}  // namespace net
}  // namespace dpmove
