// One-sided writes between engines.
//
// Receiver side: an Agent per Engine listens (tcp on a configurable address, loopback by
// default; an abstract unix socket for peers on the same host that accepts only the same uid),
// keeps the table of exposed regions (key -> Region) and the queue of notifications.
// Sender side: a Peer per connect(); it owns one Transport (shm, tcp or verbs) that moves the
// bytes of put requests and finishes their entries.
//
// Protocol invariants every transport keeps:
//  - An entry is finished 0 only after the receiver has confirmed the bytes are in its memory
//    (kAck for shm/tcp; for verbs, the completion of the signalled WRITE_WITH_IMM).
//  - A notification is delivered only when every entry of its request landed; any failed,
//    refused or missing entry suppresses it.
//  - The receiver re-checks every (key, offset, length) against its exposure table (shm and
//    tcp): the sender's check is for a clear error before any byte moves, the receiver's is
//    because it cannot trust the sender.
//  - A transport failure (peer died, protocol violation, stalled stream reset) fails every
//    unfinished entry of every request on that peer with an errno and a message naming the peer;
//    the Peer stays broken and refuses new requests until reconnect().
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dpmove/net_wire.h"
#include "dpmove/qos_gate.h"
#include "dpmove/region.h"
#include "dpmove/request.h"

namespace dpmove {

class Engine;

namespace net {

// A verbs lane: each peer connection keeps one RC queue pair per lane, whose address vector
// carries these markings (set at every INIT->RTR). The engine derives the lanes from its QoS
// configuration: one per distinct (ib_sl, roce_tclass) of its traffic classes.
struct Lane {
  uint8_t ib_sl = 0;        // InfiniBand service level, 0-15
  uint8_t roce_tclass = 0;  // GRH traffic class (RoCE: DSCP << 2)
};
constexpr int kMaxLanes = 4;

struct NetOptions {
  std::string listen_host = "127.0.0.1";  // "" or "0.0.0.0": every interface
  uint16_t listen_port = 0;               // 0: any free port
  bool listen_unix = true;                // abstract unix socket for same-host peers (shm)
  std::string name;                       // display name in metadata and messages
  // Index = PutOp::lane; 1..kMaxLanes entries. Empty: kMaxLanes lanes, SL i, tclass i << 5.
  std::vector<Lane> lanes;
};

struct ConnectOptions {
  std::string transport = "auto";  // auto | shm | tcp | verbs
  int streams = 1;                 // tcp connections per peer (1..16)
  int64_t timeout_ns = int64_t{10} * 1000000000;  // connection set-up
  int chain = 32;                  // verbs: work requests per post call (doorbell batch)
  int signal_every = 16;           // verbs: one signalled WR every k
  // shm/tcp: one more stream (number 0), the urgent lane, carries the top QoS level only;
  // the `streams` others carry the rest, their threads at a lower CPU priority (nice +10) so
  // a latency-critical copy or send is not kept waiting for a core by a bulk one. Set by the
  // engine when QoS is on.
  bool urgent_lane = false;
};

struct Notification {
  std::string peer;    // sender's display name
  Id128 sender{};      // sender engine id
  std::vector<uint8_t> data;
  uint64_t request = 0;  // sender-side request sequence
};

class Agent;

// One put request's transport-side description. `req` entries: file_offset = offset in the
// remote region, region_offset = offset in the local region (req->region()), length.
class Transport;

struct PutOp {
  std::shared_ptr<Request> req;
  RemoteHandle dst;
  std::vector<uint8_t> notify;
  bool has_notify = false;
  int lane = 0;  // verbs queue pair (NetOptions::lanes index)
  // Streams: a request of the top QoS level may use a stream kept free of lower-level work.
  bool urgent = false;
  // The connection the put was accepted on: a put that waited in the QoS gate across a
  // reconnect fails with that connection's error instead of moving to the new one.
  std::weak_ptr<Transport> via;
  uint64_t seq = 0;  // per-peer sequence number, 1-based
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;
  // Takes the op; every entry ends (finished by the transport or swept by the request's
  // deadline / cancel). Must not block on the network.
  virtual void post(std::shared_ptr<PutOp> op) = 0;
  // Validates that `dst` can be written through this transport before any byte moves
  // (e.g. shm maps the region here). Throws SysError / UsageError.
  virtual void prepare(const RemoteHandle& dst) {}
  // True when prepare(dst) would return at once (nothing to set up for this key).
  virtual bool prepared(const RemoteHandle& dst) const { return true; }
  // Wakes the progress thread (a request was cancelled).
  virtual void kick() {}
  // Fails everything unfinished with -err and `why`, stops threads. Idempotent.
  virtual void shutdown(int err, const std::string& why) = 0;
  // Empty while healthy; else why the transport is broken.
  virtual std::string broken() const = 0;
  virtual std::map<std::string, int64_t> stats() const { return {}; }
};

// Requests pass the engine's "net" QoS gate (Agent::gate) between put() and the transport:
// the gate dispatches them (Peer::dispatch), which is when they get their sequence number.
class Peer : public qos::Sink, public std::enable_shared_from_this<Peer> {
 public:
  Peer(std::shared_ptr<Agent> local, Metadata remote, ConnectOptions opts);
  ~Peer();

  // Connects (or reconnects) the transport. Throws SysError with the peer named.
  void connect();
  // Validates and posts. entries: file_offset = remote offset. Throws UsageError / SysError
  // before anything moves.
  std::shared_ptr<Request> put(const std::shared_ptr<Region>& src, const RemoteHandle& dst, const IoEntry* e,
                               size_t n, const uint8_t* notify, size_t notify_len, bool has_notify,
                               int64_t timeout_ns, bool timing, int qos_class = -1);
  // qos::Sink: posts a put the gate let through (payload: its PutOp).
  void dispatch(const std::shared_ptr<Request>& req, size_t begin, size_t end,
                const std::shared_ptr<void>& payload) override;
  void close();
  bool closed() const noexcept { return closed_.load(); }
  std::string broken() const;
  // Whether a put to `dst` can be posted without a set-up round trip (shm maps a region the
  // first time it is written): callers keep the GIL only then.
  bool prepared(const RemoteHandle& dst) const;

  const Metadata& remote() const noexcept { return remote_; }
  const char* transport_name() const;
  std::string name() const;  // "peer 'x' (pid .. on .., tcp ..)"
  std::map<std::string, int64_t> stats() const;

 private:
  std::shared_ptr<Agent> local_;
  Metadata remote_;
  ConnectOptions opts_;
  std::string chosen_;
  std::mutex connect_mu_;  // serialises connect(); never taken while holding the GIL
  mutable std::mutex mu_;  // transport_ and chosen_ only; never held across network I/O
  std::shared_ptr<Transport> transport_;
  std::mutex post_mu_;  // sequence numbers are posted in order (receivers see them ascending)
  uint64_t seq_ = 0;
  std::atomic<bool> closed_{false};
};

// A region exposed for remote writes.
struct Exposure {
  std::shared_ptr<Region> region;
  uint32_t key;
  bool writable;
};

// Receiver-side hooks a transport implementation registers (verbs: queue-pair set-up over
// the control channel). Called on the connection's thread; `fd` is a blocking socket.
using ControlHandler = std::function<void(Agent& agent, int fd, const HelloBody& hello, uint64_t session)>;

class Agent : public std::enable_shared_from_this<Agent> {
 public:
  // request_id: allocates engine-wide request ids (Engine's counter).
  Agent(NetOptions opts, std::function<uint64_t()> request_id);
  ~Agent();

  // Binds and starts listening. Throws SysError.
  void start();
  // Stops listening, closes every inbound connection and every peer. Idempotent.
  void close();
  bool closed() const noexcept { return closed_.load(); }

  const Id128& engine_id() const noexcept { return meta_.engine_id; }
  const Metadata& metadata() const noexcept { return meta_; }
  const std::string& name() const noexcept { return meta_.name; }
  const NetOptions& options() const noexcept { return opts_; }
  // Lane i's markings: options().lanes[i], or SL i / tclass i << 5 when none are configured.
  Lane lane(int i) const noexcept;
  uint64_t next_request_id() { return request_id_(); }

  RemoteHandle expose(const std::shared_ptr<Region>& r, bool writable);
  bool unexpose(uint32_t key);
  // Copy of the exposure, or nullopt-like (region null).
  Exposure find(uint32_t key) const;
  std::vector<RemoteHandle> exposures() const;

  // Blocks until a notification arrives or timeout; false on timeout / closed.
  bool next_notification(Notification* out, int64_t timeout_ns);
  // Queues a notification; false (and nothing queued) when the queue is full: the
  // application has not taken notifications for a long while.
  bool deliver(Notification n);
  size_t pending_notifications() const;

  std::shared_ptr<Peer> connect(const Metadata& m, const ConnectOptions& o);

  // Server-side statistics.
  std::map<std::string, int64_t> stats() const;
  void count(const char* what, int64_t n = 1);

  static void set_control_handler(uint32_t op, ControlHandler h);

  // The engine's network QoS gate and default class; set once, before start().
  void set_qos(std::shared_ptr<qos::Gate> gate, int default_class);
  const std::shared_ptr<qos::Gate>& gate() const noexcept { return gate_; }
  // Class index for a put (-1: the default); UsageError when out of range.
  int resolve_class(int qos_class) const;
  int class_lane(int cls) const { return class_lane_.at(static_cast<size_t>(cls)); }

 private:
  struct Conn;
  struct Session;
  void accept_loop();
  void serve(std::shared_ptr<Conn> c);
  void serve_data(const std::shared_ptr<Conn>& c, const Frame& hello, const HelloBody& body);
  void serve_map(Conn& c);
  std::shared_ptr<Session> session(uint64_t id, const HelloBody& body, uint32_t streams);
  // False on a protocol violation (the caller closes the connection).
  bool end_request(Session& s, const std::shared_ptr<Conn>& c, const Frame& end, std::vector<AckFailure> failures,
                   std::vector<uint8_t> notify);

  NetOptions opts_;
  std::shared_ptr<qos::Gate> gate_;
  int default_class_ = 0;
  std::vector<int> class_lane_;  // class index -> lane index
  std::function<uint64_t()> request_id_;
  Metadata meta_;
  std::atomic<bool> closed_{false};
  std::atomic<bool> started_{false};
  int tcp_fd_ = -1, unix_fd_ = -1, wake_fd_ = -1;
  std::thread acceptor_;

  mutable std::mutex mu_;  // exposures, conns, sessions, peers
  std::map<uint32_t, Exposure> exposed_;
  // Bumped by every unexpose: a connection thread may reuse its last lookup while unchanged.
  std::atomic<uint64_t> expo_gen_{0};
  uint32_t next_key_;
  std::vector<std::shared_ptr<Conn>> conns_;
  std::map<uint64_t, std::weak_ptr<Session>> sessions_;
  std::vector<std::weak_ptr<Peer>> peers_;

  mutable std::mutex nmu_;
  std::condition_variable ncv_;
  std::deque<Notification> notes_;
  uint64_t note_bytes_ = 0;

  mutable std::mutex smu_;
  std::map<std::string, int64_t> stats_;
};

// ---- socket helpers (blocking, with an absolute CLOCK_MONOTONIC deadline) -------------------
// Each returns 0 or -errno (-ETIMEDOUT at the deadline, -ECONNRESET on EOF mid-message).
int send_all(int fd, const void* p, size_t n, int64_t deadline_ns);
int recv_all(int fd, void* p, size_t n, int64_t deadline_ns);
int send_frame(int fd, const Frame& f, const void* trailer, size_t len, int64_t deadline_ns);
int recv_frame(int fd, Frame* f, int64_t deadline_ns);  // checks magic
// Sends kError with a message (best effort).
void send_error(int fd, int err, const std::string& msg);
// Connects to an endpoint (tcp) or abstract unix name; returns fd or -errno.
int dial_tcp(const Endpoint& e, int64_t deadline_ns);
int dial_unix(const std::string& abstract_name, int64_t deadline_ns);
// Client side of the HELLO exchange. On kError from the server, fills *why and returns -errno.
int hello(int fd, Channel ch, uint32_t stream, uint64_t session, uint32_t streams, const Id128& server,
          const Id128& client, const std::string& client_name, int64_t deadline_ns, std::string* why);

// Transports (net_tcp.cc, net_shm.cc, net_verbs.cc).
std::shared_ptr<Transport> make_tcp_transport(Agent& local, const Metadata& remote, const ConnectOptions& o,
                                              const std::string& peer_name);
std::shared_ptr<Transport> make_shm_transport(Agent& local, const Metadata& remote, const ConnectOptions& o,
                                              const std::string& peer_name);
std::shared_ptr<Transport> make_verbs_transport(Agent& local, const Metadata& remote, const ConnectOptions& o,
                                                const std::string& peer_name);
// Whether a verbs device is usable here, and why not.
bool verbs_usable(std::string* why);
// The RDMA port this engine would use (the device verbs_usable() found), for Metadata::verbs;
// empty when none is usable or verbs was not built.
std::vector<VerbsPort> verbs_local_ports();
// Registers the receiver side of the verbs transport (Channel::kVerbs) with Agent; done at
// module import. Idempotent.
void install_verbs_control_handler();

}  // namespace net
}  // namespace dpmove
