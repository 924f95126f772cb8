// The verbs transport: one-sided RDMA writes over RC queue pairs.
//
// Connection: the sender dials the receiver's tcp endpoint with a HELLO naming
// Channel::kVerbs; the receiver's Agent hands that connection to verbs_control_handler()
// (installed by install_verbs_control_handler()). Over it, as kCtrl frames (key = op) each
// answered by one kCtrlOk frame:
//   kOpQp      aux = traffic class, trailer = QpWire of the sender's QP. The receiver
//              (re)creates its QP for that class, posts receives, moves it to RTR/RTS toward
//              the sender and answers with its own QpWire. Sent at connect and after every
//              queue-pair error (recovery).
//   kOpResolve req = exposure key. Answer: offset = region size, flags = 1 when writable,
//              aux = number of ChunkWire records in the trailer (remote address and rkey of
//              each registered chunk of the region), extra = errno (then the trailer is the
//              message and there are no chunks).
//   kOpNotify  one-way (no answer): aux = immediate value, offset = traffic class, req = request
//              sequence, trailer = the notification bytes. The receiver delivers them when the
//              receive completion carrying that immediate arrives on that class's QP: RC
//              executes a QP's WRs in order, so every earlier write of the request is in its
//              memory by then.
// An unknown op or malformed frame gets kError and the connection closes.
//
// Sender data path (one progress thread per transport): entries are split at local and
// remote registration-chunk boundaries into RDMA WRITE work requests on the QP of the
// request's traffic class; WRs are posted as chained lists of up to `chain` per post_send
// (doorbell batching); one WR in every `signal_every`, and always the last of a request, is
// signalled (selective signalling). A signalled completion retires every earlier WR of its
// QP: RC completes in order. Slots of the send queue are counted as posted minus retired and
// a chain is posted only when it fits, so the queue never overflows and never fills with
// unsignalled WRs only (chain and signal_every are clamped to half the queue). The last WR of
// a request that carries a notification is RDMA_WRITE_WITH_IMM. A request whose deadline passes
// after all its WRs were posted may still have its notification delivered: every byte landed.
// Entries not started when the request became terminal are never posted; to know whether a
// WR is a request's last, the next entry is started (claimed) before the WR is posted.
//
// Work completion status -> entry errno (the entry whose WR failed; the WRs after it on the
// QP are flushed by the HCA and their entries fail with ECANCELED):
//   IBV_WC_LOC_LEN_ERR                                 EMSGSIZE
//   IBV_WC_LOC_PROT_ERR, IBV_WC_LOC_ACCESS_ERR         EFAULT   (local lkey / bounds)
//   IBV_WC_REM_ACCESS_ERR                              EACCES   (remote rkey / bounds / rights)
//   IBV_WC_REM_INV_REQ_ERR                             EINVAL
//   IBV_WC_REM_OP_ERR                                  EREMOTEIO
//   IBV_WC_RNR_RETRY_EXC_ERR                           ENOBUFS  (no receive posted at the peer)
//   IBV_WC_RETRY_EXC_ERR                               EHOSTUNREACH (peer or path gone: the
//                                                      peer is marked broken)
//   IBV_WC_RESP_TIMEOUT_ERR                            ETIMEDOUT
//   IBV_WC_REM_ABORT_ERR                               ECONNABORTED
//   IBV_WC_WR_FLUSH_ERR                                ECANCELED
//   IBV_WC_LOC_QP_OP_ERR, IBV_WC_BAD_RESP_ERR, other
//   protocol errors                                    EPROTO
//   IBV_WC_FATAL_ERR, IBV_WC_GENERAL_ERR, unknown      EIO
// After a failed completion the QP goes RESET -> INIT, a fresh kOpQp exchange follows, then
// RTR -> RTS (queue-pair recovery), and later requests use it. Control connection EOF fails
// everything unfinished with ECONNRESET; IBV_WC_RETRY_EXC_ERR with EHOSTUNREACH; both leave
// the transport broken() until the Peer reconnects.
#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <random>

#include "dpmove/gpu.h"
#include "dpmove/net.h"
#include "dpmove/status.h"
#include "dpmove/verbs_api.h"

namespace dpmove {
namespace net {

using verbs::VerbsApi;

namespace {

// Registers [addr, addr + len) of `mem` with the HCA. Host memory and emulated device memory:
// ibv_reg_mr. CUDA device memory: a dma-buf of the range (cuMemGetHandleForAddressRange, then
// ibv_reg_dmabuf_mr; the fd is closed once the MR holds the pages) where the driver and
// libibverbs both offer it, else ibv_reg_mr on the device address, which works where the
// nvidia-peermem module is loaded. nullptr + errno on failure.
ibv_mr* reg_memory(VerbsApi& api, ibv_pd* pd, const Memory& mem, uint8_t* addr, size_t len, int access) {
  gpu::GpuApi* g = mem.gpu_api();
  if (!mem.is_device() || !g || g->emulated()) return api.reg_mr(pd, addr, len, access);
  const uint64_t a = reinterpret_cast<uint64_t>(addr);
  const uint64_t start = a & ~uint64_t{4095};
  const uint64_t end = (a + len + 4095) & ~uint64_t{4095};
  int fd = -1;
  if (g->dmabuf_fd(start, end - start, &fd) == 0 && fd >= 0) {
    ibv_mr* m = api.reg_dmabuf_mr(pd, a - start, len, a, fd, access);
    int err = errno;
    ::close(fd);
    if (m) return m;
    errno = err;
  }
  return api.reg_mr(pd, addr, len, access);
}


enum CtrlOp : uint32_t { kOpQp = 1, kOpResolve = 2, kOpNotify = 3 };

constexpr int kNumClasses = 4;
constexpr uint32_t kSqDepth = 512;     // send WRs per sender QP
constexpr uint32_t kRecvDepth = 1024;  // receives posted per receiver QP
constexpr uint64_t kMaxWrBytes = uint64_t{1} << 30;
constexpr int64_t kCtrlTimeoutNs = int64_t{10} * 1000000000;
// Receivers re-check that every region they registered for a sender is still exposed this
// often (ns); an unexposed region's MRs are deregistered, so its rkeys stop working.
constexpr int64_t kExposureSweepNs = 100 * 1000000;
// A receiver holds notification bytes until their immediate arrives, and immediates until
// their bytes arrive. An honest sender has at most a send queue of WRs per class in flight, so
// these caps only stop a hostile or broken one from growing the receiver without bound.
constexpr size_t kMaxPendingNotes = 16384;
constexpr uint64_t kMaxPendingNoteBytes = uint64_t{256} << 20;

static_assert(kNumClasses == kMaxLanes, "one queue pair per verbs lane");

#pragma pack(push, 1)
struct QpWire {
  uint32_t qpn;
  uint32_t psn;  // 24 bits used
  uint16_t lid;
  uint8_t mtu;  // enum ibv_mtu
  uint8_t link_layer;
  uint8_t gid[16];
  uint32_t reserved;
};
struct ChunkWire {
  uint64_t offset;  // from the region start, bytes
  uint64_t length;
  uint64_t addr;    // remote virtual address of `offset`
  uint32_t rkey;
  uint32_t reserved;
};
#pragma pack(pop)
static_assert(sizeof(QpWire) == 32, "QpWire is 32 bytes on the wire");
static_assert(sizeof(ChunkWire) == 32, "ChunkWire is 32 bytes on the wire");

std::string errstr(int e) { return errno_str(e); }

int wc_errno(int st) {
  switch (st) {
    case IBV_WC_SUCCESS: return 0;
    case IBV_WC_LOC_LEN_ERR: return EMSGSIZE;
    case IBV_WC_LOC_PROT_ERR:
    case IBV_WC_LOC_ACCESS_ERR: return EFAULT;
    case IBV_WC_REM_ACCESS_ERR: return EACCES;
    case IBV_WC_REM_INV_REQ_ERR: return EINVAL;
    case IBV_WC_REM_OP_ERR: return EREMOTEIO;
    case IBV_WC_RNR_RETRY_EXC_ERR: return ENOBUFS;
    case IBV_WC_RETRY_EXC_ERR: return EHOSTUNREACH;
    case IBV_WC_RESP_TIMEOUT_ERR: return ETIMEDOUT;
    case IBV_WC_REM_ABORT_ERR: return ECONNABORTED;
    case IBV_WC_WR_FLUSH_ERR: return ECANCELED;
    case IBV_WC_LOC_QP_OP_ERR:
    case IBV_WC_LOC_EEC_OP_ERR:
    case IBV_WC_MW_BIND_ERR:
    case IBV_WC_BAD_RESP_ERR:
    case IBV_WC_LOC_RDD_VIOL_ERR:
    case IBV_WC_REM_INV_RD_REQ_ERR:
    case IBV_WC_INV_EECN_ERR:
    case IBV_WC_INV_EEC_STATE_ERR: return EPROTO;
    default: return EIO;
  }
}

uint32_t random_psn() {
  static thread_local std::mt19937 rng{std::random_device{}()};
  return rng() & 0xffffff;
}

// An opened device, its protection domain and the port used. Owns ctx and pd.
struct Device {
  VerbsApi* api = nullptr;
  ibv_context* ctx = nullptr;
  ibv_pd* pd = nullptr;
  std::string name;
  uint8_t port = 1;
  ibv_port_attr pattr{};
  int gid_index = 0;
  ibv_gid gid{};
  uint32_t max_qp_wr = 0;

  Device() = default;
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  ~Device() {
    if (pd) api->dealloc_pd(pd);
    if (ctx) api->close_device(ctx);
  }

  // The device named by DPMOVE_VERBS_DEVICE ("mlx5_0" or "mlx5_0:2"), else the first device
  // with an active port. GID index: DPMOVE_VERBS_GID_INDEX (default 0; RoCE v2 setups often
  // need the index of their IPv4-mapped v2 GID). Returns 0 or -errno with *why filled.
  int open(VerbsApi& a, std::string* why) {
    api = &a;
    std::string err = a.load_error();
    if (!err.empty()) {
      *why = err;
      return -ENOSYS;
    }
    std::string want;
    int want_port = 0;
    if (const char* e = std::getenv("DPMOVE_VERBS_DEVICE")) {
      want = e;
      auto c = want.find(':');
      if (c != std::string::npos) {
        want_port = std::atoi(want.c_str() + c + 1);
        want.resize(c);
      }
    }
    if (const char* e = std::getenv("DPMOVE_VERBS_GID_INDEX")) gid_index = std::atoi(e);
    int n = 0;
    ibv_device** list = a.get_device_list(&n);
    if (!list) {
      int e = errno ? errno : ENODEV;
      *why = "ibv_get_device_list failed: " + errstr(e) + " (is the ib_uverbs kernel module loaded?)";
      return -e;
    }
    if (n == 0) {
      a.free_device_list(list);
      *why = "no RDMA device found (ibv_get_device_list returned none; the kernel has no RDMA NIC or driver)";
      return -ENODEV;
    }
    std::string tried;
    int rc = -ENODEV;
    for (int i = 0; i < n && !ctx; ++i) {
      std::string dn = a.get_device_name(list[i]);
      if (!want.empty() && dn != want) continue;
      ibv_context* c = a.open_device(list[i]);
      if (!c) {
        tried += " " + dn + ": open failed (" + errstr(errno) + ");";
        continue;
      }
      ibv_device_attr da{};
      int r = a.query_device(c, &da);
      if (r) {
        tried += " " + dn + ": query_device failed (" + errstr(r) + ");";
        a.close_device(c);
        continue;
      }
      for (int p = 1; p <= da.phys_port_cnt && !ctx; ++p) {
        if (want_port && p != want_port) continue;
        ibv_port_attr pa{};
        r = a.query_port(c, static_cast<uint8_t>(p), &pa);
        if (r || pa.state != IBV_PORT_ACTIVE) {
          tried += " " + dn + ":" + std::to_string(p) + (r ? " query failed;" : " not active;");
          continue;
        }
        ibv_gid g{};
        r = a.query_gid(c, static_cast<uint8_t>(p), gid_index, &g);
        if (r && pa.link_layer == IBV_LINK_LAYER_ETHERNET) {
          tried += " " + dn + ":" + std::to_string(p) + " has no GID at index " + std::to_string(gid_index) + ";";
          continue;
        }
        if (r) std::memset(&g, 0, sizeof g);
        ctx = c;
        name = dn;
        port = static_cast<uint8_t>(p);
        pattr = pa;
        gid = g;
        max_qp_wr = static_cast<uint32_t>(da.max_qp_wr);
      }
      if (!ctx) a.close_device(c);
    }
    a.free_device_list(list);
    if (!ctx) {
      *why = want.empty() ? "no RDMA device with an active port:" + tried
                          : "RDMA device '" + want + "' (DPMOVE_VERBS_DEVICE) not found or not active:" + tried;
      return rc;
    }
    pd = a.alloc_pd(ctx);
    if (!pd) {
      int e = errno ? errno : ENOMEM;
      *why = "ibv_alloc_pd on " + name + ": " + errstr(e);
      return -e;
    }
    return 0;
  }

  QpWire local_info(ibv_qp* qp, uint32_t psn) const {
    QpWire w{};
    w.qpn = qp->qp_num;
    w.psn = psn;
    w.lid = pattr.lid;
    w.mtu = static_cast<uint8_t>(pattr.active_mtu);
    w.link_layer = pattr.link_layer;
    std::memcpy(w.gid, gid.raw, 16);
    return w;
  }
};

// RESET -> INIT. Returns 0 or a positive errno (libibverbs convention).
int qp_init(VerbsApi& a, ibv_qp* qp, const Device& d, int access) {
  ibv_qp_attr at{};
  at.qp_state = IBV_QPS_INIT;
  at.pkey_index = 0;
  at.port_num = d.port;
  at.qp_access_flags = access;
  return a.modify_qp(qp, &at, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
}

// INIT -> RTR toward `r`, with the class's service level and (over a GRH) traffic class.
// `lane`: the InfiniBand service level and GRH traffic class (RoCE: DSCP << 2) this queue
// pair's packets carry; the engine maps its QoS classes to lanes (Agent::lane).
int qp_rtr(VerbsApi& a, ibv_qp* qp, const Device& d, const QpWire& r, Lane lane) {
  ibv_qp_attr at{};
  at.qp_state = IBV_QPS_RTR;
  at.path_mtu = static_cast<ibv_mtu>(std::min<int>(d.pattr.active_mtu, r.mtu ? static_cast<int>(r.mtu) : static_cast<int>(IBV_MTU_1024)));
  at.dest_qp_num = r.qpn;
  at.rq_psn = r.psn;
  at.max_dest_rd_atomic = 1;
  at.min_rnr_timer = 12;  // 0.64 ms
  at.ah_attr.dlid = r.lid;
  at.ah_attr.sl = lane.ib_sl;
  at.ah_attr.port_num = d.port;
  bool any_gid = false;
  for (uint8_t b : r.gid) any_gid |= b != 0;
  // RoCE needs the GRH; on InfiniBand it is needed only across subnets, and the peer's GID
  // is then what routes the packet.
  if (d.pattr.link_layer == IBV_LINK_LAYER_ETHERNET || (any_gid && std::getenv("DPMOVE_VERBS_GRH"))) {
    at.ah_attr.is_global = 1;
    std::memcpy(at.ah_attr.grh.dgid.raw, r.gid, 16);
    at.ah_attr.grh.sgid_index = static_cast<uint8_t>(d.gid_index);
    at.ah_attr.grh.hop_limit = 64;
    at.ah_attr.grh.traffic_class = lane.roce_tclass;
  }
  return a.modify_qp(qp, &at,
                     IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                         IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
}

int qp_rts(VerbsApi& a, ibv_qp* qp, uint32_t psn) {
  ibv_qp_attr at{};
  at.qp_state = IBV_QPS_RTS;
  at.sq_psn = psn;
  at.timeout = 14;    // 4.096 us * 2^14 = 67 ms per try
  at.retry_cnt = 7;   // then IBV_WC_RETRY_EXC_ERR: about half a second to declare a peer gone
  at.rnr_retry = 7;   // a receiver without a posted receive is waited for, not failed
  at.max_rd_atomic = 1;
  return a.modify_qp(qp, &at,
                     IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                         IBV_QP_MAX_QP_RD_ATOMIC);
}

int qp_reset(VerbsApi& a, ibv_qp* qp) {
  ibv_qp_attr at{};
  at.qp_state = IBV_QPS_RESET;
  return a.modify_qp(qp, &at, IBV_QP_STATE);
}

// Reads the trailer of a frame whose header was received; caps it at `cap` bytes.
int recv_trailer(int fd, const Frame& f, std::vector<uint8_t>* out, uint64_t cap, int64_t dl) {
  if (f.length > cap) return -EMSGSIZE;
  out->resize(static_cast<size_t>(f.length));
  return f.length ? recv_all(fd, out->data(), out->size(), dl) : 0;
}

// =============================================================================================
// Receiver
// =============================================================================================

class Responder {
 public:
  Responder(Agent& agent, int fd, const HelloBody& hello) : agent_(agent), fd_(fd), api_(verbs::verbs_api()) {
    std::memcpy(&hello_, &hello, sizeof hello);
    client_name_.assign(hello.client_name, strnlen(hello.client_name, sizeof hello.client_name));
  }
  ~Responder() { teardown(); }

  void run() {
    std::string why;
    int r = dev_.open(api_, &why);
    if (r < 0) {
      send_error(fd_, -r, "verbs: this engine has no usable RDMA device: " + why);
      return;
    }
    // Hardware: sleep on a completion channel. The fake offers none: poll with backoff.
    channel_ = api_.create_comp_channel(dev_.ctx);
    if (channel_) {
      int fl = fcntl(channel_->fd, F_GETFL);
      if (fl < 0 || fcntl(channel_->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        send_error(fd_, errno, "verbs: making the completion channel non-blocking: " + errstr(errno));
        return;
      }
    }
    cq_ = api_.create_cq(dev_.ctx, kNumClasses * kRecvDepth + 64, nullptr, channel_, 0);
    if (!cq_) {
      send_error(fd_, errno ? errno : ENOMEM, "verbs: ibv_create_cq on " + dev_.name + ": " + errstr(errno));
      return;
    }
    int64_t next_sweep = now_ns() + kExposureSweepNs;
    int64_t idle_ns = 20000;
    for (;;) {
      bool busy = drain_cq();
      int64_t timeout = 0;
      if (!busy && channel_) {
        // Arm, then look once more: a completion that raced the arming is not slept through.
        if (api_.req_notify_cq(cq_, 0) == 0 && drain_cq()) continue;
        timeout = kExposureSweepNs;
      } else if (!busy) {
        // Back off from 20 us to 1 ms while idle, so notifications still arrive promptly.
        timeout = idle_ns;
        idle_ns = std::min<int64_t>(idle_ns * 2, 1000000);
      } else {
        idle_ns = 20000;
      }
      pollfd p[2] = {{fd_, POLLIN, 0}, {channel_ ? channel_->fd : -1, POLLIN, 0}};
      timespec ts{static_cast<time_t>(timeout / 1000000000), static_cast<long>(timeout % 1000000000)};
      if (ppoll(p, 2, &ts, nullptr) < 0 && errno != EINTR) return;
      if (channel_ && (p[1].revents & POLLIN)) {
        ibv_cq* ev_cq;
        void* ev_ctx;
        while (api_.get_cq_event(channel_, &ev_cq, &ev_ctx) == 0) api_.ack_cq_events(ev_cq, 1);
      }
      // EOF, reset or Agent::close's shutdown() all make the socket readable.
      if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
        if (!serve_frame()) return;
        idle_ns = 20000;
      }
      if (now_ns() >= next_sweep) {
        sweep_exposures();
        next_sweep = now_ns() + kExposureSweepNs;
      }
    }
  }

 private:
  struct Qp {
    ibv_qp* qp = nullptr;
    uint32_t gen = 0;  // incarnation; in the receive wr_id, so stale completions are ignored
  };
  struct Reg {
    std::shared_ptr<Region> region;
    std::vector<ibv_mr*> mrs;
    std::vector<ChunkWire> chunks;
  };
  struct Pending {
    int tc;
    uint64_t request;
    std::vector<uint8_t> data;
  };

  static uint64_t recv_id(int tc, uint32_t gen) { return (uint64_t{gen} << 8) | static_cast<uint64_t>(tc); }

  int post_recvs(int tc, uint32_t n) {
    std::vector<ibv_recv_wr> w(n);
    for (uint32_t i = 0; i < n; ++i) {
      w[i].wr_id = recv_id(tc, qps_[tc].gen);
      w[i].next = i + 1 < n ? &w[i + 1] : nullptr;
      w[i].sg_list = nullptr;  // WRITE_WITH_IMM puts no payload in the receive buffer
      w[i].num_sge = 0;
    }
    ibv_recv_wr* bad = nullptr;
    return api_.post_recv(qps_[tc].qp, w.data(), &bad);
  }

  void destroy_qp(int tc) {
    if (!qps_[tc].qp) return;
    api_.destroy_qp(qps_[tc].qp);
    qps_[tc].qp = nullptr;
    // Notifications of the old incarnation can no longer be matched: its receives are gone.
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->second.tc != tc) {
        ++it;
        continue;
      }
      pending_bytes_ -= it->second.data.size();
      it = pending_.erase(it);
    }
    for (auto it = arrived_.begin(); it != arrived_.end();) it = it->second == tc ? arrived_.erase(it) : std::next(it);
  }

  void teardown() {
    for (int tc = 0; tc < kNumClasses; ++tc) destroy_qp(tc);
    for (auto& kv : regs_)
      for (ibv_mr* m : kv.second.mrs) api_.dereg_mr(m);
    regs_.clear();
    if (cq_) api_.destroy_cq(cq_);
    cq_ = nullptr;
    if (channel_) api_.destroy_comp_channel(channel_);
    channel_ = nullptr;
  }

  bool reply(const Frame& req, uint64_t offset, uint32_t aux, uint16_t flags, uint64_t extra, const void* t, size_t n) {
    Frame f;
    f.type = static_cast<uint16_t>(FrameType::kCtrlOk);
    f.key = req.key;
    f.req = req.req;
    f.offset = offset;
    f.aux = aux;
    f.flags = flags;
    f.extra = extra;
    f.length = n;
    return send_frame(fd_, f, t, n, now_ns() + kCtrlTimeoutNs) == 0;
  }

  bool fail(int err, const std::string& msg) {
    send_error(fd_, err, "verbs (" + dev_.name + ", sender " + client_name_ + "): " + msg);
    return false;
  }

  // One control frame. False: the connection ends (EOF, error, protocol violation).
  bool serve_frame() {
    Frame f;
    int64_t dl = now_ns() + kCtrlTimeoutNs;
    if (recv_frame(fd_, &f, dl) < 0) return false;
    if (f.type != static_cast<uint16_t>(FrameType::kCtrl)) return fail(EPROTO, "expected a control frame");
    std::vector<uint8_t> t;
    uint64_t cap = f.key == kOpNotify ? kMaxNotifyBytes : sizeof(QpWire);
    if (recv_trailer(fd_, f, &t, cap, dl) < 0) return fail(EPROTO, "oversized or truncated control frame");
    switch (f.key) {
      case kOpQp: return serve_qp(f, t);
      case kOpResolve: return serve_resolve(f);
      case kOpNotify: return serve_notify(f, std::move(t));
      default: return fail(EPROTO, "unknown verbs control op " + std::to_string(f.key));
    }
  }

  bool serve_qp(const Frame& f, const std::vector<uint8_t>& t) {
    if (t.size() != sizeof(QpWire) || f.aux >= kNumClasses) return fail(EPROTO, "bad queue-pair exchange");
    int tc = static_cast<int>(f.aux);
    QpWire peer;
    std::memcpy(&peer, t.data(), sizeof peer);
    // The sender re-exchanges after its QP failed. Immediates that arrived before the failure
    // may still sit in the CQ: match them to their notifications now, or the old QP's
    // destruction would drop notifications of requests that fully succeeded.
    drain_cq();
    destroy_qp(tc);
    ibv_qp_init_attr ia{};
    ia.send_cq = cq_;
    ia.recv_cq = cq_;
    ia.cap.max_send_wr = 1;
    ia.cap.max_recv_wr = std::min(kRecvDepth, dev_.max_qp_wr ? dev_.max_qp_wr : kRecvDepth);
    ia.cap.max_send_sge = 1;
    ia.cap.max_recv_sge = 1;
    ia.qp_type = IBV_QPT_RC;
    ibv_qp* qp = api_.create_qp(dev_.pd, &ia);
    if (!qp) return fail(errno ? errno : ENOMEM, "ibv_create_qp: " + errstr(errno));
    qps_[tc].qp = qp;
    qps_[tc].gen++;
    api_.label_qp(qp, "recv:" + client_name_ + ":tc" + std::to_string(tc));
    uint32_t psn = random_psn();
    int r = qp_init(api_, qp, dev_, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    if (!r) r = post_recvs(tc, ia.cap.max_recv_wr);
    if (!r) r = qp_rtr(api_, qp, dev_, peer, agent_.lane(tc));
    if (!r) r = qp_rts(api_, qp, psn);
    if (r) {
      destroy_qp(tc);
      return fail(r, "bringing up the receive queue pair of traffic class " + std::to_string(tc) + ": " + errstr(r));
    }
    QpWire mine = dev_.local_info(qp, psn);
    return reply(f, 0, f.aux, 0, 0, &mine, sizeof mine);
  }

  // Registers the exposed region in chunks (remote write) once per key; every rkey covers
  // only bytes inside the exposure, so a sender can never reach memory around it.
  bool serve_resolve(const Frame& f) {
    const uint32_t key = static_cast<uint32_t>(f.req);
    Exposure e = agent_.find(key);
    int err = 0;
    std::string msg;
    if (!e.region || e.region->closed()) {
      err = ENOENT;
      msg = "no region is exposed under key " + std::to_string(key);
    } else if (!e.writable || !e.region->writable()) {
      err = EACCES;
      msg = "region " + std::to_string(key) + " is exposed read-only";
    }
    if (err) return reply(f, 0, 0, 0, static_cast<uint64_t>(err), msg.data(), msg.size());
    auto it = regs_.find(key);
    if (it == regs_.end() || it->second.region != e.region) {
      if (it != regs_.end()) drop_reg(it);
      Reg reg;
      reg.region = e.region;
      size_t chunk = verbs::reg_chunk_bytes();
      size_t size = e.region->size();
      for (size_t off = 0; off < size; off += chunk) {
        size_t len = std::min(chunk, size - off);
        ibv_mr* m = reg_memory(api_, dev_.pd, *e.region->memory(), e.region->data() + off, len,
                               IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
        if (!m) {
          err = errno ? errno : ENOMEM;
          for (ibv_mr* x : reg.mrs) api_.dereg_mr(x);
          msg = "registering region " + std::to_string(key) + " (" + std::to_string(size) + " bytes) with " + dev_.name +
                ": ibv_reg_mr: " + errstr(err) + (err == ENOMEM || err == EPERM ? " (RLIMIT_MEMLOCK?)" : "");
          return reply(f, 0, 0, 0, static_cast<uint64_t>(err), msg.data(), msg.size());
        }
        reg.mrs.push_back(m);
        reg.chunks.push_back(ChunkWire{off, len, reinterpret_cast<uintptr_t>(e.region->data() + off), m->rkey, 0});
      }
      it = regs_.emplace(key, std::move(reg)).first;
      agent_.count("verbs_regions_registered");
    }
    const Reg& reg = it->second;
    return reply(f, reg.region->size(), static_cast<uint32_t>(reg.chunks.size()), e.writable ? 1 : 0, 0,
                 reg.chunks.data(), reg.chunks.size() * sizeof(ChunkWire));
  }

  void drop_reg(std::map<uint32_t, Reg>::iterator it) {
    for (ibv_mr* m : it->second.mrs) api_.dereg_mr(m);
    regs_.erase(it);
  }

  void sweep_exposures() {
    for (auto it = regs_.begin(); it != regs_.end();) {
      auto cur = it++;
      Exposure e = agent_.find(cur->first);
      if (!e.region || e.region != cur->second.region || e.region->closed()) drop_reg(cur);
    }
  }

  bool serve_notify(const Frame& f, std::vector<uint8_t> data) {
    if (f.offset >= kNumClasses) return fail(EPROTO, "notification for traffic class " + std::to_string(f.offset));
    uint32_t imm = f.aux;
    auto a = arrived_.find(imm);
    if (a != arrived_.end()) {
      arrived_.erase(a);
      deliver(f.req, std::move(data));
      return true;
    }
    if (pending_.size() >= kMaxPendingNotes || pending_bytes_ + data.size() > kMaxPendingNoteBytes)
      return fail(ENOBUFS, std::to_string(pending_.size()) + " notifications (" + std::to_string(pending_bytes_) +
                               " bytes) wait for their immediates: the sender is not writing them");
    auto old = pending_.find(imm);
    if (old != pending_.end()) pending_bytes_ -= old->second.data.size();
    pending_bytes_ += data.size();
    pending_[imm] = Pending{static_cast<int>(f.offset), f.req, std::move(data)};
    return true;
  }

  void deliver(uint64_t request, std::vector<uint8_t> data) {
    Notification n;
    n.peer = client_name_;
    n.sender = hello_.client_engine;
    n.data = std::move(data);
    n.request = request;
    // False: the engine's notification queue is full (the application stopped taking them);
    // the Agent counts the drop.
    if (agent_.deliver(std::move(n))) agent_.count("verbs_notifications");
  }

  bool drain_cq() {
    ibv_wc wc[32];
    bool any = false;
    for (;;) {
      int n = api_.poll_cq(cq_, 32, wc);
      if (n <= 0) return any;
      any = true;
      for (int i = 0; i < n; ++i) on_recv(wc[i]);
    }
  }

  void on_recv(const ibv_wc& wc) {
    int tc = static_cast<int>(wc.wr_id & 0xff);
    uint32_t gen = static_cast<uint32_t>(wc.wr_id >> 8);
    if (tc >= kNumClasses || !qps_[tc].qp || qps_[tc].gen != gen) return;  // an old incarnation's
    if (wc.status != IBV_WC_SUCCESS) return;  // the sender sees its side fail and re-exchanges
    if (wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM && (wc.wc_flags & IBV_WC_WITH_IMM)) {
      uint32_t imm = ntohl(wc.imm_data);
      auto p = pending_.find(imm);
      if (p != pending_.end()) {
        Pending x = std::move(p->second);
        pending_.erase(p);
        pending_bytes_ -= x.data.size();
        deliver(x.request, std::move(x.data));
      } else if (arrived_.size() < kMaxPendingNotes) {
        arrived_[imm] = tc;
      } else {
        // More immediates without bytes than any honest sender has in flight: drop one (the
        // lowest value); its request's notification is lost, never misdelivered.
        arrived_.erase(arrived_.begin());
        arrived_[imm] = tc;
        agent_.count("verbs_immediates_dropped");
      }
    }
    post_recvs(tc, 1);
  }

  Agent& agent_;
  int fd_;
  VerbsApi& api_;
  HelloBody hello_;
  std::string client_name_;
  Device dev_;
  ibv_comp_channel* channel_ = nullptr;
  ibv_cq* cq_ = nullptr;
  Qp qps_[kNumClasses];
  std::map<uint32_t, Reg> regs_;
  std::map<uint32_t, Pending> pending_;  // notification bytes whose immediate has not arrived
  uint64_t pending_bytes_ = 0;
  std::map<uint32_t, int> arrived_;      // immediates whose bytes have not arrived -> class
};

void verbs_control_handler(Agent& agent, int fd, const HelloBody& hello, uint64_t) {
  Responder r(agent, fd, hello);
  r.run();
}

// =============================================================================================
// Sender
// =============================================================================================

struct Resolved {
  uint64_t size = 0;
  std::vector<ChunkWire> chunks;  // sorted by offset, contiguous from 0
  // Chunk containing region offset `off` (< size), by binary search.
  const ChunkWire& at(uint64_t off) const {
    auto it = std::upper_bound(chunks.begin(), chunks.end(), off,
                               [](uint64_t o, const ChunkWire& c) { return o < c.offset; });
    return *(it - 1);
  }
};

struct LocalReg {
  std::weak_ptr<Memory> mem;
  size_t chunk = 0;
  std::vector<ibv_mr*> mrs;  // mrs[i] covers memory bytes [i * chunk, ...)
};

struct EntryTrack {
  uint32_t posted = 0;   // WRs posted for the entry
  uint32_t retired = 0;  // of those, completed (successfully or not)
  bool all_posted = false;
  int32_t err = 0;       // first failure, -errno
};

struct OpState {
  std::shared_ptr<PutOp> op;
  std::shared_ptr<Resolved> dst;
  LocalReg* src = nullptr;
  std::vector<EntryTrack> track;
  size_t next = 0;                  // next entry to try to start
  size_t cur = SIZE_MAX;            // started entry being split into WRs
  uint64_t off = 0;                 // bytes of `cur` already in WRs
  bool refused = false;             // an entry could not start (request went terminal)
  bool failed = false;              // an entry failed: no notification
  bool posting_done = false;
  int64_t inflight = 0;             // WRs posted and not retired
  uint32_t imm = 0;
};

struct WrRec {
  uint64_t wr_id;
  std::shared_ptr<OpState> op;
  size_t entry;  // SIZE_MAX: the zero-length WR of a request without entries
  bool signalled;
};

class VerbsTransport final : public Transport, public std::enable_shared_from_this<VerbsTransport> {
 public:
  VerbsTransport(Agent& local, const Metadata& remote, const ConnectOptions& o, std::string peer_name)
      : api_(verbs::verbs_api()), remote_(remote), opts_(o), peer_(std::move(peer_name)) {
    local_name_ = local.name();
    local_id_ = local.engine_id();
    for (int tc = 0; tc < kNumClasses; ++tc) lanes_[tc] = local.lane(tc);
  }

  ~VerbsTransport() override {
    shutdown(ESHUTDOWN, "the transport was destroyed");
    for (int tc = 0; tc < kNumClasses; ++tc)
      if (qps_[tc].qp) api_.destroy_qp(qps_[tc].qp);
    for (auto& kv : local_regs_)
      for (ibv_mr* m : kv.second->mrs) api_.dereg_mr(m);
    if (cq_) api_.destroy_cq(cq_);
    if (channel_) api_.destroy_comp_channel(channel_);
    dev_.reset();
    if (ctrl_fd_ >= 0) ::close(ctrl_fd_);
    if (wake_fd_ >= 0) ::close(wake_fd_);
  }

  // Opens the device, dials the control connection, brings up one QP per class. Throws
  // SysError naming the peer.
  void connect() {
    int64_t dl = now_ns() + opts_.timeout_ns;
    std::string why;
    dev_.reset(new Device());
    int r = dev_->open(api_, &why);
    if (r < 0) throw UnsupportedError(-r, "transport 'verbs' to " + peer_ + ": " + why);
    sq_depth_ = std::min(kSqDepth, dev_->max_qp_wr ? dev_->max_qp_wr : kSqDepth);
    chain_ = std::max(1, std::min<int>(opts_.chain, static_cast<int>(sq_depth_ / 2)));
    signal_every_ = std::max(1, std::min<int>(opts_.signal_every, static_cast<int>(sq_depth_ / 2)));
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) throw_sys(errno, "verbs transport to " + peer_ + ": eventfd");
    channel_ = api_.create_comp_channel(dev_->ctx);  // null on the fake: poll instead
    cq_ = api_.create_cq(dev_->ctx, static_cast<int>(kNumClasses * sq_depth_ + 64), nullptr, channel_, 0);
    if (!cq_) throw_sys(errno ? errno : ENOMEM, "verbs transport to " + peer_ + ": ibv_create_cq on " + dev_->name);
    if (channel_) {
      int fl = fcntl(channel_->fd, F_GETFL);
      if (fl < 0 || fcntl(channel_->fd, F_SETFL, fl | O_NONBLOCK) < 0)
        throw_sys(errno, "verbs transport to " + peer_ + ": making the completion channel non-blocking");
      r = api_.req_notify_cq(cq_, 0);
      if (r) throw_sys(r, "verbs transport to " + peer_ + ": ibv_req_notify_cq");
    }

    int err = ENOTCONN;
    std::string dial_err;
    for (const Endpoint& e : remote_.tcp) {
      int fd = dial_tcp(e, dl);
      if (fd < 0) {
        err = -fd;
        dial_err += " " + e.str() + ": " + errstr(-fd) + ";";
        continue;
      }
      uint64_t session;
      Id128 rnd = random_id();
      std::memcpy(&session, rnd.data(), sizeof session);
      std::string hwhy;
      r = hello(fd, Channel::kVerbs, 0, session, 1, remote_.engine_id, local_id_, local_name_, dl, &hwhy);
      if (r < 0) {
        ::close(fd);
        throw SysError(-r, "verbs control connection to " + peer_ + " refused: " + (hwhy.empty() ? errstr(-r) : hwhy));
      }
      ctrl_fd_ = fd;
      break;
    }
    if (ctrl_fd_ < 0) throw SysError(err, "verbs control connection to " + peer_ + " failed:" + dial_err);

    for (int tc = 0; tc < kNumClasses; ++tc) {
      ibv_qp_init_attr ia{};
      ia.send_cq = cq_;
      ia.recv_cq = cq_;
      ia.cap.max_send_wr = sq_depth_;
      ia.cap.max_recv_wr = 1;
      ia.cap.max_send_sge = 1;
      ia.cap.max_recv_sge = 1;
      ia.qp_type = IBV_QPT_RC;
      ia.sq_sig_all = 0;  // selective signalling: IBV_SEND_SIGNALED per WR
      ibv_qp* qp = api_.create_qp(dev_->pd, &ia);
      if (!qp) throw_sys(errno ? errno : ENOMEM, "verbs transport to " + peer_ + ": ibv_create_qp on " + dev_->name);
      qps_[tc].qp = qp;
      api_.label_qp(qp, "send:" + local_name_ + "->" + remote_.name + ":tc" + std::to_string(tc));
      std::string w;
      r = bring_up(tc, dl, &w);
      if (r) throw SysError(r, "verbs transport to " + peer_ + ": " + w);
    }
    thread_ = std::thread([this] { progress_loop(); });
  }

  const char* name() const override { return "verbs"; }

  void prepare(const RemoteHandle& dst) override {
    std::string why;
    std::shared_ptr<Resolved> r;
    int e = resolve(dst.key, &r, &why);
    if (e) throw SysError(e, why);
  }

  // A region is ready once resolved (its rkeys cached); the first put to it asks the peer.
  bool prepared(const RemoteHandle& dst) const override {
    std::lock_guard<std::mutex> lk(rmu_);
    return resolved_.count(dst.key) > 0;
  }

  void post(std::shared_ptr<PutOp> op) override {
    {
      std::lock_guard<std::mutex> lk(qmu_);
      if (broken_.empty()) {
        incoming_.push_back(std::move(op));
        op = nullptr;
      }
    }
    if (op) {
      fail_unstarted(*op, -broken_err_.load(), broken());
      return;
    }
    kick();
  }

  void kick() override {
    uint64_t one = 1;
    ssize_t r = ::write(wake_fd_, &one, sizeof one);
    (void)r;  // EAGAIN: the counter is already non-zero, the thread will wake
  }

  void shutdown(int err, const std::string& why) override {
    {
      std::lock_guard<std::mutex> lk(qmu_);
      if (broken_.empty()) {
        broken_ = why;
        broken_err_.store(err);
      }
    }
    stop_.store(true);
    // The progress thread may be blocked in a control exchange (resolve, notify, QP
    // recovery) with a silent peer: shutting the socket down returns it at once.
    if (ctrl_fd_ >= 0) ::shutdown(ctrl_fd_, SHUT_RDWR);
    if (wake_fd_ >= 0) kick();
    if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
    // The progress thread is gone (or was never started): fail what it left.
    fail_everything(err, broken());
  }

  std::string broken() const override {
    std::lock_guard<std::mutex> lk(qmu_);
    return broken_;
  }

  std::map<std::string, int64_t> stats() const override {
    std::map<std::string, int64_t> s;
    s["wrs_posted"] = st_wrs_.load();
    s["post_calls"] = st_posts_.load();
    s["signalled_wrs"] = st_signalled_.load();
    s["completions"] = st_cqes_.load();
    s["qp_recoveries"] = st_recoveries_.load();
    s["bytes_posted"] = st_bytes_.load();
    s["notifications"] = st_notes_.load();
    s["outstanding_wrs"] = st_outstanding_.load();
    s["chain"] = chain_;
    s["signal_every"] = signal_every_;
    s["sq_depth"] = sq_depth_;
    return s;
  }

 private:
  struct Qp {
    ibv_qp* qp = nullptr;
    std::deque<WrRec> posted;  // in post order; front = oldest unretired
    std::vector<WrRec> unposted;  // refused by a failed post_send; settled by recovery
    int since_signal = 0;      // unsignalled WRs posted since the last signalled one
    bool needs_recovery = false;
    bool error_seen = false;  // an error completion of this incarnation was handled
    std::deque<std::shared_ptr<OpState>> ops;  // FIFO of ops on this class
  };

  // Moves the QP of class tc RESET -> INIT, exchanges QpWire over the control connection,
  // then RTR -> RTS. Returns 0 or a positive errno with *why.
  int bring_up(int tc, int64_t dl, std::string* why) {
    ibv_qp* qp = qps_[tc].qp;
    int r = qp_reset(api_, qp);
    if (!r) r = qp_init(api_, qp, *dev_, 0);
    if (r) {
      *why = "queue pair of traffic class " + std::to_string(tc) + " to INIT: " + errstr(r);
      return r;
    }
    uint32_t psn = random_psn();
    QpWire mine = dev_->local_info(qp, psn), theirs{};
    Frame f;
    f.type = static_cast<uint16_t>(FrameType::kCtrl);
    f.key = kOpQp;
    f.aux = static_cast<uint32_t>(tc);
    std::vector<uint8_t> t;
    Frame rep;
    r = rpc(f, &mine, sizeof mine, &rep, &t, dl, why);
    if (r) return r;
    if (t.size() != sizeof theirs) {
      *why = "malformed queue-pair reply from " + peer_;
      return EPROTO;
    }
    std::memcpy(&theirs, t.data(), sizeof theirs);
    r = qp_rtr(api_, qp, *dev_, theirs, lanes_[tc]);
    if (!r) r = qp_rts(api_, qp, psn);
    if (r) *why = "queue pair of traffic class " + std::to_string(tc) + " to RTR/RTS: " + errstr(r);
    return r;
  }

  // One request/answer on the control connection. Returns 0 or a positive errno with *why.
  int rpc(Frame f, const void* t, size_t n, Frame* rep, std::vector<uint8_t>* rt, int64_t dl, std::string* why) {
    f.length = n;
    std::lock_guard<std::mutex> lk(ctrl_mu_);
    if (ctrl_fd_ < 0) {
      *why = "no control connection to " + peer_;
      return ENOTCONN;
    }
    int r = send_frame(ctrl_fd_, f, t, n, dl);
    if (!r) r = recv_frame(ctrl_fd_, rep, dl);
    if (!r) r = recv_trailer(ctrl_fd_, *rep, rt, kMaxTrailer, dl);
    if (r) {
      // The exchange stopped half way: a late reply would answer the next request (a region
      // key resolved to another region's rkeys). The connection is unusable; shutting it down
      // makes the progress thread break the transport (check_ctrl sees EOF).
      ::shutdown(ctrl_fd_, SHUT_RDWR);
      *why = "verbs control connection to " + peer_ + ": " + errstr(-r);
      return -r;
    }
    if (rep->type == static_cast<uint16_t>(FrameType::kError)) {
      *why = peer_ + " refused: " + std::string(rt->begin(), rt->end());
      return rep->aux ? static_cast<int>(rep->aux) : EPROTO;
    }
    // The receiver echoes the op and its argument (req: region key; aux: traffic class).
    if (rep->type != static_cast<uint16_t>(FrameType::kCtrlOk) || rep->key != f.key || rep->req != f.req ||
        (f.key == kOpQp && rep->aux != f.aux)) {
      ::shutdown(ctrl_fd_, SHUT_RDWR);
      *why = "unexpected control reply from " + peer_;
      return EPROTO;
    }
    return 0;
  }

  // Remote address / rkey per chunk of exposure `key`, cached. Returns 0 or a positive errno.
  int resolve(uint32_t key, std::shared_ptr<Resolved>* out, std::string* why) {
    {
      std::lock_guard<std::mutex> lk(rmu_);
      auto it = resolved_.find(key);
      if (it != resolved_.end()) {
        *out = it->second;
        return 0;
      }
    }
    Frame f;
    f.type = static_cast<uint16_t>(FrameType::kCtrl);
    f.key = kOpResolve;
    Frame rep;
    std::vector<uint8_t> t;
    // The key travels in `req`: the frame's `key` field names the op.
    f.req = key;
    int r = rpc(f, nullptr, 0, &rep, &t, now_ns() + kCtrlTimeoutNs, why);
    if (r) return r;
    if (rep.extra) {
      *why = peer_ + " region " + std::to_string(key) + ": " + std::string(t.begin(), t.end());
      return static_cast<int>(rep.extra);
    }
    auto res = std::make_shared<Resolved>();
    res->size = rep.offset;
    if (t.size() != size_t{rep.aux} * sizeof(ChunkWire)) {
      *why = "malformed region reply from " + peer_;
      return EPROTO;
    }
    res->chunks.resize(rep.aux);
    if (!t.empty()) std::memcpy(res->chunks.data(), t.data(), t.size());
    uint64_t expect = 0;
    for (auto& c : res->chunks) {
      if (c.offset != expect || c.length == 0) {
        *why = "non-contiguous region chunks from " + peer_;
        return EPROTO;
      }
      expect += c.length;
    }
    if (expect != res->size) {
      *why = "region chunks from " + peer_ + " do not cover the region";
      return EPROTO;
    }
    std::lock_guard<std::mutex> lk(rmu_);
    resolved_[key] = res;
    *out = res;
    return 0;
  }

  // Local registration of `mem`, in chunks, cached; 0 or a positive errno.
  int local_reg(const std::shared_ptr<Memory>& mem, LocalReg** out, std::string* why) {
    auto it = local_regs_.find(mem.get());
    if (it != local_regs_.end() && it->second->mem.lock() == mem) {
      *out = it->second.get();
      return 0;
    }
    // Memory freed since (its address may be reused): drop every stale registration.
    for (auto i = local_regs_.begin(); i != local_regs_.end();) {
      if (i->second->mem.expired() || i->first == mem.get()) {
        for (ibv_mr* m : i->second->mrs) api_.dereg_mr(m);
        i = local_regs_.erase(i);
      } else {
        ++i;
      }
    }
    auto reg = std::make_unique<LocalReg>();
    reg->mem = mem;
    reg->chunk = verbs::reg_chunk_bytes();
    for (size_t off = 0; off < mem->size(); off += reg->chunk) {
      size_t len = std::min(reg->chunk, mem->size() - off);
      // Source of RDMA WRITE only: the HCA reads it, no access flag is needed.
      ibv_mr* m = reg_memory(api_, dev_->pd, *mem, mem->base() + off, len, 0);
      if (!m) {
        int e = errno ? errno : ENOMEM;
        for (ibv_mr* x : reg->mrs) api_.dereg_mr(x);
        *why = "registering " + std::to_string(mem->size()) + " bytes of local memory with " + dev_->name + ": " + errstr(e);
        return e;
      }
      reg->mrs.push_back(m);
    }
    *out = reg.get();
    local_regs_[mem.get()] = std::move(reg);
    return 0;
  }

  // ---- progress thread ---------------------------------------------------------------------

  void progress_loop() {
    int64_t idle_ns = 20000;
    while (!stop_.load()) {
      bool busy = false;
      take_incoming();
      busy |= drain_cq();
      for (int tc = 0; tc < kNumClasses && !stop_.load(); ++tc) {
        if (qps_[tc].needs_recovery) recover(tc);
        busy |= post_some(tc);
        reap(tc);
      }
      if (stop_.load()) break;
      check_ctrl();
      int64_t outstanding = 0;
      for (auto& q : qps_) outstanding += static_cast<int64_t>(q.posted.size());
      st_outstanding_.store(outstanding);
      if (busy) {
        idle_ns = 20000;
        continue;
      }
      // Sleep until kicked (post, cancel, shutdown), the control socket stirs, or - with
      // completions outstanding - the completion channel fires (hardware) or a poll interval
      // passes (no channel: back off 20 us .. 1 ms).
      int64_t timeout = 100 * 1000000;
      if (outstanding && channel_) {
        if (api_.req_notify_cq(cq_, 0) == 0 && drain_cq()) continue;  // raced with a completion
      } else if (outstanding) {
        timeout = idle_ns;
        idle_ns = std::min<int64_t>(idle_ns * 2, 1000000);
      }
      pollfd p[3] = {{wake_fd_, POLLIN, 0}, {ctrl_fd_, POLLIN, 0}, {channel_ ? channel_->fd : -1, POLLIN, 0}};
      timespec ts{static_cast<time_t>(timeout / 1000000000), static_cast<long>(timeout % 1000000000)};
      ppoll(p, 3, &ts, nullptr);
      if (p[0].revents & POLLIN) {
        uint64_t v;
        ssize_t r = ::read(wake_fd_, &v, sizeof v);
        (void)r;
      }
      if (channel_ && (p[2].revents & POLLIN)) {
        ibv_cq* ev_cq;
        void* ev_ctx;
        while (api_.get_cq_event(channel_, &ev_cq, &ev_ctx) == 0) api_.ack_cq_events(ev_cq, 1);
      }
    }
  }

  void take_incoming() {
    std::deque<std::shared_ptr<PutOp>> in;
    {
      std::lock_guard<std::mutex> lk(qmu_);
      in.swap(incoming_);
    }
    while (!in.empty()) {
      if (stop_.load()) {
        // Left for fail_everything(), which fails what is still in incoming_.
        std::lock_guard<std::mutex> lk(qmu_);
        incoming_.insert(incoming_.begin(), in.begin(), in.end());
        return;
      }
      auto op = std::move(in.front());
      in.pop_front();
      activate(std::move(op));
    }
  }

  // Resolves the destination, registers the source and queues the op on its class.
  void activate(std::shared_ptr<PutOp> op) {
    auto s = std::make_shared<OpState>();
    s->op = op;
    s->track.resize(op->req->size());
    std::string why;
    int e = resolve(op->dst.key, &s->dst, &why);
    if (!e) e = local_reg(op->req->region()->memory(), &s->src, &why);
    if (e) {
      op->req->set_detail(why);
      fail_unstarted(*op, -e, why);
      return;
    }
    if (op->has_notify) {
      s->imm = ++imm_seq_;
      if (s->imm == 0) s->imm = ++imm_seq_;
    }
    int tc = std::max(0, std::min(kNumClasses - 1, op->lane));
    if (op->req->size() == 0 && !op->has_notify) return;
    advance(*s);
    if (s->cur == SIZE_MAX && op->req->size() > 0) {
      s->posting_done = true;  // nothing could start: the request is already terminal
      return;
    }
    qps_[tc].ops.push_back(std::move(s));
  }

  // Starts the next entry that can start and makes it `cur`; cur = SIZE_MAX when none is
  // left. An entry that cannot be written (outside the resolved region) is finished here.
  void advance(OpState& s) {
    Request& req = *s.op->req;
    s.cur = SIZE_MAX;
    s.off = 0;
    req.poll();  // applies the deadline, so a late request starts nothing more
    while (s.next < req.size()) {
      size_t i = s.next++;
      if (!req.start(i)) {
        s.refused = true;
        continue;
      }
      const IoEntry& x = req.entry(i);
      if (static_cast<uint64_t>(x.file_offset) + static_cast<uint64_t>(x.length) > s.dst->size) {
        // The region shrank or changed under the same key since the handle was made.
        s.failed = true;
        req.set_detail(peer_ + " region " + std::to_string(s.op->dst.key) + " is now " + std::to_string(s.dst->size) +
                       " bytes: entry " + std::to_string(i) + " does not fit");
        req.finish(i, -ERANGE, 0);
        continue;
      }
      s.cur = i;
      return;
    }
  }

  // Posts chains of WRs on class tc while work and send-queue room remain. True if it posted.
  bool post_some(int tc) {
    Qp& q = qps_[tc];
    bool any = false;
    if (q.needs_recovery || !q.qp) return false;
    std::vector<ibv_send_wr> wrs(static_cast<size_t>(chain_));
    std::vector<ibv_sge> sges(static_cast<size_t>(chain_));
    std::vector<WrRec> recs;
    std::vector<std::pair<uint32_t, std::shared_ptr<OpState>>> notes;
    for (;;) {
      // A chain goes out only whole: the doorbell count stays ceil(WRs / chain), and the
      // queue still holds >= signal_every WRs, one of them signalled, whose completion frees
      // room.
      if (sq_depth_ - q.posted.size() < static_cast<size_t>(chain_)) return any;
      recs.clear();
      notes.clear();
      size_t n = 0;
      for (auto& sp : q.ops) {
        if (n == static_cast<size_t>(chain_)) break;
        OpState& s = *sp;
        if (s.posting_done) continue;
        while (n < static_cast<size_t>(chain_) && !s.posting_done) {
          build_wr(tc, sp, &wrs[n], &sges[n], &recs, &notes);
          ++n;
        }
      }
      if (n == 0) return any;
      for (size_t i = 0; i < n; ++i) wrs[i].next = i + 1 < n ? &wrs[i + 1] : nullptr;
      // The notification bytes go first, so the receiver usually has them when the immediate
      // arrives (it copes with either order).
      for (auto& nt : notes) send_note(tc, *nt.second);
      ibv_send_wr* bad = nullptr;
      int r = api_.post_send(q.qp, wrs.data(), &bad);
      st_posts_++;
      size_t ok = r ? static_cast<size_t>(bad - wrs.data()) : n;
      if (r && (!bad || ok > n)) ok = 0;
      for (size_t i = 0; i < n; ++i) {
        if (i < ok) {
          q.posted.push_back(std::move(recs[i]));
          st_wrs_++;
          if (wrs[i].send_flags & IBV_SEND_SIGNALED) st_signalled_++;
          st_bytes_ += wrs[i].num_sge ? wrs[i].sg_list->length : 0;
        } else {
          q.unposted.push_back(std::move(recs[i]));
        }
      }
      any = true;
      if (r) {
        // Usually the QP went to ERR under us: its error completion is already in the CQ,
        // and the next drain tells whether the peer is gone (RETRY_EXC: fail everything) or
        // the QP just needs recovery (these WRs then end as flushed).
        if (last_error_.empty())
          last_error_ = "ibv_post_send to " + peer_ + " (traffic class " + std::to_string(tc) + "): " + errstr(r);
        q.needs_recovery = true;
        return any;
      }
    }
  }

  // Fills one WR from the op's current entry and advances the op.
  void build_wr(int tc, const std::shared_ptr<OpState>& sp, ibv_send_wr* w, ibv_sge* sg, std::vector<WrRec>* recs,
                std::vector<std::pair<uint32_t, std::shared_ptr<OpState>>>* notes) {
    OpState& s = *sp;
    Qp& q = qps_[tc];
    Request& req = *s.op->req;
    std::memset(w, 0, sizeof *w);
    uint64_t wr_id = ++wr_seq_;
    size_t entry = s.cur;
    uint64_t len = 0, raddr = 0;
    uint32_t rkey = 0;
    if (entry != SIZE_MAX) {
      const IoEntry& x = req.entry(entry);
      uint64_t remain = static_cast<uint64_t>(x.length) - s.off;
      uint64_t loff = req.region()->offset_in_memory() + static_cast<uint64_t>(x.region_offset) + s.off;
      uint64_t roff = static_cast<uint64_t>(x.file_offset) + s.off;
      len = std::min(remain, kMaxWrBytes);
      len = std::min<uint64_t>(len, s.src->chunk - loff % s.src->chunk);
      if (s.dst->chunks.empty()) {
        len = 0;  // zero-length entry into an empty region
      } else {
        const ChunkWire& c = s.dst->at(std::min(roff, s.dst->size ? s.dst->size - 1 : 0));
        if (roff < c.offset + c.length) len = std::min<uint64_t>(len, c.offset + c.length - roff);
        raddr = c.addr + (roff - c.offset);
        rkey = c.rkey;
      }
      if (len) {
        ibv_mr* mr = s.src->mrs[loff / s.src->chunk];
        sg->addr = reinterpret_cast<uintptr_t>(req.region()->memory()->base() + loff);
        sg->length = static_cast<uint32_t>(len);
        sg->lkey = mr->lkey;
        w->sg_list = sg;
        w->num_sge = 1;
      }
      s.off += len;
      s.track[entry].posted++;
      if (s.off == static_cast<uint64_t>(x.length)) {
        s.track[entry].all_posted = true;
        advance(s);  // starts the next entry now, so we know whether this WR is the last
      }
    } else if (!s.dst->chunks.empty()) {
      raddr = s.dst->chunks[0].addr;
      rkey = s.dst->chunks[0].rkey;
    }
    bool last = s.cur == SIZE_MAX;
    if (last) s.posting_done = true;
    bool signalled = last || ++q.since_signal >= signal_every_;
    if (signalled) q.since_signal = 0;
    w->wr_id = wr_id;
    w->opcode = IBV_WR_RDMA_WRITE;
    w->send_flags = signalled ? IBV_SEND_SIGNALED : 0;
    w->wr.rdma.remote_addr = raddr;
    w->wr.rdma.rkey = rkey;
    if (last && s.op->has_notify && !s.refused && !s.failed) {
      w->opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
      w->imm_data = htonl(s.imm);
      notes->emplace_back(s.imm, sp);
    }
    s.inflight++;
    recs->push_back(WrRec{wr_id, sp, entry, signalled});
  }

  void send_note(int tc, OpState& s) {
    Frame f;
    f.type = static_cast<uint16_t>(FrameType::kCtrl);
    f.key = kOpNotify;
    f.aux = s.imm;
    f.offset = static_cast<uint64_t>(tc);
    f.req = s.op->seq;
    f.length = s.op->notify.size();
    std::lock_guard<std::mutex> lk(ctrl_mu_);
    int r = send_frame(ctrl_fd_, f, s.op->notify.data(), s.op->notify.size(), now_ns() + kCtrlTimeoutNs);
    // On failure the immediate lands without its bytes and no notification is delivered; the
    // control connection is then gone and check_ctrl() breaks the transport.
    if (r == 0) st_notes_++;
  }

  // A WR is done (0) or failed (-errno): account it to its entry and finish the entry when
  // its last WR is done.
  void retire(const WrRec& rec, int32_t err) {
    if (!rec.op) return;
    OpState& s = *rec.op;
    s.inflight--;
    if (err) s.failed = true;
    if (rec.entry == SIZE_MAX) return;
    EntryTrack& t = s.track[rec.entry];
    t.retired++;
    if (err && !t.err) t.err = err;
    maybe_finish(s, rec.entry);
  }

  void maybe_finish(OpState& s, size_t i) {
    EntryTrack& t = s.track[i];
    if (!t.all_posted || t.retired != t.posted) return;
    t.posted = UINT32_MAX;  // finished: never again
    int64_t len = s.op->req->entry(i).length;
    s.op->req->finish(i, t.err, t.err ? 0 : len);
  }

  bool drain_cq() {
    ibv_wc wc[64];
    bool any = false;
    for (;;) {
      int n = api_.poll_cq(cq_, 64, wc);
      if (n <= 0) return any;
      any = true;
      st_cqes_ += n;
      for (int i = 0; i < n; ++i) on_completion(wc[i]);
      int64_t outstanding = 0;
      for (auto& q : qps_) outstanding += static_cast<int64_t>(q.posted.size());
      st_outstanding_.store(outstanding);
    }
  }

  void on_completion(const ibv_wc& wc) {
    int tc = -1;
    for (int i = 0; i < kNumClasses; ++i)
      if (qps_[i].qp && qps_[i].qp->qp_num == wc.qp_num) tc = i;
    if (tc < 0) return;
    Qp& q = qps_[tc];
    // wr_ids grow monotonically: one older than the oldest posted WR belongs to an
    // incarnation of the QP that recovery already settled.
    if (q.posted.empty() || wc.wr_id < q.posted.front().wr_id) return;
    if (wc.status == IBV_WC_SUCCESS) {
      // RC completes in order: this completion covers every earlier unsignalled WR.
      while (!q.posted.empty() && q.posted.front().wr_id <= wc.wr_id) {
        WrRec rec = std::move(q.posted.front());
        q.posted.pop_front();
        retire(rec, 0);
      }
      return;
    }
    // Flushes behind the first error of this incarnation: recovery settles those WRs.
    if (q.error_seen) return;
    q.error_seen = true;
    // The WRs before the failed one were executed (in-order completion); it failed; the HCA
    // flushes the rest.
    while (!q.posted.empty() && q.posted.front().wr_id < wc.wr_id) {
      WrRec rec = std::move(q.posted.front());
      q.posted.pop_front();
      retire(rec, 0);
    }
    int e = wc_errno(wc.status);
    char vendor[32];
    std::snprintf(vendor, sizeof vendor, "vendor_err 0x%x", wc.vendor_err);
    std::string msg = "RDMA write to " + peer_ + " failed: " + verbs::wc_status_text(wc.status) + " (" +
                      verbs::wc_status_name(wc.status) + ", " + vendor + ", traffic class " + std::to_string(tc) + ")";
    if (!q.posted.empty() && q.posted.front().wr_id == wc.wr_id) {
      WrRec rec = std::move(q.posted.front());
      q.posted.pop_front();
      if (rec.op) rec.op->op->req->set_detail(msg);
      retire(rec, -e);
    }
    last_error_ = msg;
    q.needs_recovery = true;
    if (wc.status == IBV_WC_RETRY_EXC_ERR) {
      // Transport retries exhausted: the peer's host, HCA or path is gone.
      break_transport(EHOSTUNREACH, msg);
    }
  }

  // Ends every WR of q, posted or not, with `status` and `why` as its request's detail. Call
  // only once the QP is in RESET: the HCA no longer touches these WRs' buffers.
  void retire_all(Qp& q, int32_t status, const std::string& why) {
    while (!q.posted.empty()) {
      WrRec rec = std::move(q.posted.front());
      q.posted.pop_front();
      if (rec.op) rec.op->op->req->set_detail(why);
      retire(rec, status);
    }
    for (WrRec& rec : q.unposted) {
      if (rec.op) rec.op->op->req->set_detail(why);
      retire(rec, status);
    }
    q.unposted.clear();
  }

  // Settles every WR still posted on class tc (flushed: ECANCELED), abandons a half-posted
  // entry, and brings the QP up again with a fresh queue-pair exchange.
  void recover(int tc) {
    Qp& q = qps_[tc];
    // RESET first: once it returns the HCA no longer touches the buffers of these WRs, so
    // their entries may end.
    qp_reset(api_, q.qp);
    retire_all(q, -ECANCELED, "flushed after an earlier work request to " + peer_ + " failed" +
                                  (last_error_.empty() ? "" : " (" + last_error_ + ")"));
    q.since_signal = 0;
    for (auto& sp : q.ops) {
      OpState& s = *sp;
      if (s.cur != SIZE_MAX && s.off > 0) {
        // Part of this entry went into flushed WRs: it cannot succeed; the entries after it
        // still go out on the recovered QP.
        EntryTrack& t = s.track[s.cur];
        t.all_posted = true;
        if (!t.err) t.err = -ECANCELED;
        s.failed = true;
        size_t i = s.cur;
        advance(s);
        maybe_finish(s, i);
        if (s.cur == SIZE_MAX) s.posting_done = true;
      }
    }
    std::string why;
    int r = bring_up(tc, now_ns() + kCtrlTimeoutNs, &why);
    if (r) {
      break_transport(r, "queue-pair recovery with " + peer_ + " failed: " + why);
      return;
    }
    q.needs_recovery = false;
    q.error_seen = false;
    last_error_.clear();
    st_recoveries_++;
  }

  // Drops ops whose entries all ended and whose WRs all retired.
  void reap(int tc) {
    auto& ops = qps_[tc].ops;
    while (!ops.empty() && ops.front()->posting_done && ops.front()->inflight == 0) ops.pop_front();
  }

  // EOF or an unsolicited kError on the control connection means the peer is gone.
  void check_ctrl() {
    std::unique_lock<std::mutex> lk(ctrl_mu_, std::try_to_lock);
    if (!lk.owns_lock() || ctrl_fd_ < 0) return;
    pollfd p{ctrl_fd_, POLLIN, 0};
    if (::poll(&p, 1, 0) <= 0) return;
    std::string why = "the verbs control connection to " + peer_ + " was closed by the peer";
    int err = ECONNRESET;
    Frame f;
    char c;
    if (::recv(ctrl_fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT) > 0 && recv_frame(ctrl_fd_, &f, now_ns() + 1000000000) == 0 &&
        f.type == static_cast<uint16_t>(FrameType::kError)) {
      std::vector<uint8_t> t;
      recv_trailer(ctrl_fd_, f, &t, 4096, now_ns() + 1000000000);
      why = peer_ + " ended the verbs connection: " + std::string(t.begin(), t.end());
      if (f.aux) err = static_cast<int>(f.aux);
    }
    lk.unlock();
    break_transport(err, why);
  }

  // From the progress thread: marks the transport broken and fails everything.
  void break_transport(int err, const std::string& why) {
    {
      std::lock_guard<std::mutex> lk(qmu_);
      if (broken_.empty()) {
        broken_ = why;
        broken_err_.store(err);
      }
    }
    stop_.store(true);
    // Tells the receiver at once, so it releases this connection's QPs and registrations.
    if (ctrl_fd_ >= 0) ::shutdown(ctrl_fd_, SHUT_RDWR);
    fail_everything(err, why);
  }

  // Every QP to RESET (the HCA stops touching buffers), then every unfinished entry of every
  // op fails with -err. Runs on the progress thread or after it was joined.
  void fail_everything(int err, const std::string& why) {
    std::lock_guard<std::mutex> lk(fail_mu_);
    for (int tc = 0; tc < kNumClasses; ++tc) {
      Qp& q = qps_[tc];
      if (q.qp) qp_reset(api_, q.qp);
      retire_all(q, -err, why);
      for (auto& sp : q.ops) {
        OpState& s = *sp;
        s.op->req->set_detail(why);
        if (s.cur != SIZE_MAX) {
          s.track[s.cur].all_posted = true;
          if (!s.track[s.cur].err) s.track[s.cur].err = -err;
          maybe_finish(s, s.cur);
          s.cur = SIZE_MAX;
        }
        fail_unstarted_from(s, -err);
        s.posting_done = true;
      }
      q.ops.clear();
    }
    std::deque<std::shared_ptr<PutOp>> in;
    {
      std::lock_guard<std::mutex> lk2(qmu_);
      in.swap(incoming_);
    }
    for (auto& op : in) fail_unstarted(*op, -err, why);
  }

  void fail_unstarted_from(OpState& s, int32_t err) {
    Request& req = *s.op->req;
    while (s.next < req.size()) {
      size_t i = s.next++;
      if (req.start(i)) req.finish(i, err, 0);
    }
  }

  void fail_unstarted(PutOp& op, int32_t err, const std::string& why) {
    op.req->set_detail(why);
    for (size_t i = 0; i < op.req->size(); ++i)
      if (op.req->start(i)) op.req->finish(i, err, 0);
  }

  VerbsApi& api_;
  Metadata remote_;
  ConnectOptions opts_;
  std::string peer_;
  std::string local_name_;
  Id128 local_id_{};

  std::unique_ptr<Device> dev_;
  ibv_comp_channel* channel_ = nullptr;
  ibv_cq* cq_ = nullptr;
  uint32_t sq_depth_ = kSqDepth;
  int chain_ = 32, signal_every_ = 16;
  Lane lanes_[kNumClasses];  // fixed at construction
  Qp qps_[kNumClasses];  // progress thread only (and fail_everything once it stopped)
  std::map<Memory*, std::unique_ptr<LocalReg>> local_regs_;  // progress thread only
  uint64_t wr_seq_ = 0;
  uint32_t imm_seq_ = 0;
  std::string last_error_;

  int ctrl_fd_ = -1;
  std::mutex ctrl_mu_;  // one exchange at a time on the control connection
  int wake_fd_ = -1;

  mutable std::mutex rmu_;
  std::map<uint32_t, std::shared_ptr<Resolved>> resolved_;

  mutable std::mutex qmu_;  // incoming_, broken_
  std::deque<std::shared_ptr<PutOp>> incoming_;
  std::string broken_;
  std::atomic<int> broken_err_{0};
  std::mutex fail_mu_;

  std::atomic<bool> stop_{false};
  std::thread thread_;

  std::atomic<int64_t> st_wrs_{0}, st_posts_{0}, st_signalled_{0}, st_cqes_{0}, st_recoveries_{0}, st_bytes_{0},
      st_notes_{0}, st_outstanding_{0};
};

}  // namespace

void install_verbs_control_handler() {
  Agent::set_control_handler(static_cast<uint32_t>(Channel::kVerbs), verbs_control_handler);
}

std::shared_ptr<Transport> make_verbs_transport(Agent& local, const Metadata& remote, const ConnectOptions& o,
                                                const std::string& peer_name) {
  install_verbs_control_handler();
  auto t = std::make_shared<VerbsTransport>(local, remote, o, peer_name);
  t->connect();
  return t;
}

std::vector<VerbsPort> verbs_local_ports() {
  std::vector<VerbsPort> out;
  Device d;
  std::string why;
  if (d.open(verbs::verbs_api(), &why) < 0) return out;
  VerbsPort p;
  p.device = d.name;
  p.port = d.port;
  p.lid = d.pattr.lid;
  std::memcpy(p.gid.data(), d.gid.raw, 16);
  out.push_back(std::move(p));
  return out;
}

bool verbs_usable(std::string* why) {
  VerbsApi& a = verbs::verbs_api();
  Device d;
  std::string w;
  if (d.open(a, &w) < 0) {
    if (why) *why = std::string(a.provider()) + ": " + w;
    return false;
  }
  if (why) *why = std::string(a.provider()) + ": " + d.name + " port " + std::to_string(d.port);
  return true;
}

}  // namespace net
}  // namespace dpmove
