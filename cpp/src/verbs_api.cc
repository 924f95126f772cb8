// Providers of VerbsApi: libibverbs through dlopen, and the in-process fake HCA.
//
// What the fake models: one device "fake0" with one active RoCE-like port (LID 1, a link-local
// GID, 4096-byte MTU); PDs; MRs with lkey/rkey, access flags and bounds; CQs with a capacity
// (overflow is counted and moves the QPs feeding it to ERR); RC QPs with the
// RESET -> INIT -> RTR -> RTS -> ERR state machine and the attribute masks each transition
// needs; a "NIC" thread that executes posted send WRs asynchronously, in order per QP:
// RDMA_WRITE gathers the local SGEs (lkey, PD and bounds checked: IBV_WC_LOC_PROT_ERR) and
// copies into the remote MR found by rkey (PD, bounds and IBV_ACCESS_REMOTE_WRITE on both MR
// and QP checked: IBV_WC_REM_ACCESS_ERR); RDMA_WRITE_WITH_IMM also consumes a posted recv at
// the remote QP and completes it there with IBV_WC_RECV_RDMA_WITH_IMM and the immediate; with
// no recv posted it waits when the sender's rnr_retry is 7 (retry forever, as hardware) and
// else completes with IBV_WC_RNR_RETRY_EXC_ERR. Send completions are generated for signalled
// WRs only; errors always complete; a failed WR moves its QP to ERR and flushes every later
// WR (send and recv) with IBV_WC_WR_FLUSH_ERR. Send-queue slots are freed only when a send
// completion is polled (retiring every earlier WR of that QP), as providers do, so a sender
// that never signals fills its queue: post_send then fails with ENOMEM. post_send on a QP not
// in RTS fails with EINVAL. A target QP that is dead (kill_qp), missing, or not in RTR/RTS
// makes the WR complete with IBV_WC_RETRY_EXC_ERR.
//
// Not modelled: packets, MTU segmentation, PSNs (checked for presence only), timing, RDMA
// READ / SEND / atomics, SRQs, address handles, completion channels (create_comp_channel
// fails with ENOSYS, so users poll), async events, responder-side QP errors (a remote access
// error leaves the responder QP as it was), memory windows, device limits beyond the queue
// depths. Data lands with memcpy under the fake's lock, so "visible at the responder" is
// immediate and ordered.
#include "dpmove/verbs_api.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "dpmove/status.h"

namespace dpmove {
namespace verbs {

// ---- libibverbs ----------------------------------------------------------------------------

namespace {

class RealVerbs final : public VerbsApi {
 public:
  RealVerbs() {
    // DPMOVE_LIBIBVERBS names another file (tests use a missing one to check the module
    // without rdma-core). RTLD_LOCAL: the symbols stay private to these pointers; the provider
    // libraries libibverbs loads later (libmlx5 ...) resolve against it on their own.
    const char* env = std::getenv("DPMOVE_LIBIBVERBS");
    const std::string name = env && *env ? env : "libibverbs.so.1";
    lib_ = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib_) {
      const char* e = dlerror();
      err_ = name + " could not be loaded (Debian: apt-get install libibverbs1 ibverbs-providers): " +
             (e ? e : "unknown dlopen error");
      return;
    }
    lib_name_ = name;
    bool ok = true;
    auto sym = [&](auto& fn, const char* name) {
      void* p = dlsym(lib_, name);
      if (!p) {
        if (ok) err_ = lib_name_ + " lacks " + name;
        ok = false;
      }
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
    };
    sym(get_device_list_, "ibv_get_device_list");
    sym(free_device_list_, "ibv_free_device_list");
    sym(get_device_name_, "ibv_get_device_name");
    sym(open_device_, "ibv_open_device");
    sym(close_device_, "ibv_close_device");
    sym(query_device_, "ibv_query_device");
    sym(query_port_compat_, "ibv_query_port");
    sym(query_gid_, "ibv_query_gid");
    sym(alloc_pd_, "ibv_alloc_pd");
    sym(dealloc_pd_, "ibv_dealloc_pd");
    sym(reg_mr_, "ibv_reg_mr");
    sym(dereg_mr_, "ibv_dereg_mr");
    // Optional: GPU memory is registered through peer memory without it.
    reg_dmabuf_mr_ = reinterpret_cast<decltype(reg_dmabuf_mr_)>(dlsym(lib_, "ibv_reg_dmabuf_mr"));
    sym(create_comp_channel_, "ibv_create_comp_channel");
    sym(destroy_comp_channel_, "ibv_destroy_comp_channel");
    sym(create_cq_, "ibv_create_cq");
    sym(destroy_cq_, "ibv_destroy_cq");
    sym(get_cq_event_, "ibv_get_cq_event");
    sym(ack_cq_events_, "ibv_ack_cq_events");
    sym(create_qp_, "ibv_create_qp");
    sym(modify_qp_, "ibv_modify_qp");
    sym(destroy_qp_, "ibv_destroy_qp");
    if (!ok) {
      dlclose(lib_);
      lib_ = nullptr;
    }
  }
  // The library stays loaded for the life of the process: provider drivers it loaded may
  // still be referenced by objects other threads hold.
  ~RealVerbs() override = default;

  const char* provider() const override { return "libibverbs"; }
  std::string load_error() const override { return err_; }

  ibv_device** get_device_list(int* n) override {
    if (!lib_) return fail<ibv_device**>();
    return get_device_list_(n);
  }
  void free_device_list(ibv_device** l) override { if (lib_ && l) free_device_list_(l); }
  const char* get_device_name(ibv_device* d) override { return lib_ ? get_device_name_(d) : "?"; }
  ibv_context* open_device(ibv_device* d) override { return lib_ ? open_device_(d) : fail<ibv_context*>(); }
  int close_device(ibv_context* c) override { return lib_ ? close_device_(c) : ENOSYS; }
  int query_device(ibv_context* c, ibv_device_attr* a) override { return lib_ ? query_device_(c, a) : ENOSYS; }
  int query_port(ibv_context* c, uint8_t port, ibv_port_attr* a) override {
    if (!lib_) return ENOSYS;
    // Extended contexts carry a query_port op that fills the full ibv_port_attr; older ones
    // only the exported compat entry point, which fills the leading fields (verbs.h does the
    // same dispatch in its inline ibv_query_port).
    struct verbs_context* vctx = verbs_get_ctx_op(c, query_port);
    if (vctx) return vctx->query_port(c, port, a, sizeof(*a));
    std::memset(a, 0, sizeof(*a));
    return query_port_compat_(c, port, reinterpret_cast<struct _compat_ibv_port_attr*>(a));
  }
  int query_gid(ibv_context* c, uint8_t port, int i, ibv_gid* g) override { return lib_ ? query_gid_(c, port, i, g) : ENOSYS; }
  ibv_pd* alloc_pd(ibv_context* c) override { return lib_ ? alloc_pd_(c) : fail<ibv_pd*>(); }
  int dealloc_pd(ibv_pd* p) override { return lib_ ? dealloc_pd_(p) : ENOSYS; }
  ibv_mr* reg_mr(ibv_pd* p, void* a, size_t n, int acc) override { return lib_ ? reg_mr_(p, a, n, acc) : fail<ibv_mr*>(); }
  int dereg_mr(ibv_mr* m) override { return lib_ ? dereg_mr_(m) : ENOSYS; }
  ibv_mr* reg_dmabuf_mr(ibv_pd* p, uint64_t off, size_t n, uint64_t iova, int fd, int acc) override {
    if (!lib_ || !reg_dmabuf_mr_) {
      errno = EOPNOTSUPP;
      return nullptr;
    }
    return reg_dmabuf_mr_(p, off, n, iova, fd, acc);
  }
  ibv_comp_channel* create_comp_channel(ibv_context* c) override {
    return lib_ ? create_comp_channel_(c) : fail<ibv_comp_channel*>();
  }
  int destroy_comp_channel(ibv_comp_channel* ch) override { return lib_ ? destroy_comp_channel_(ch) : ENOSYS; }
  ibv_cq* create_cq(ibv_context* c, int cqe, void* ctx, ibv_comp_channel* ch, int vec) override {
    return lib_ ? create_cq_(c, cqe, ctx, ch, vec) : fail<ibv_cq*>();
  }
  int destroy_cq(ibv_cq* cq) override { return lib_ ? destroy_cq_(cq) : ENOSYS; }
  // Data-path calls: static inline in verbs.h, dispatched through the context's ops table
  // that the provider driver filled in.
  int req_notify_cq(ibv_cq* cq, int solicited_only) override {
    return cq->context->ops.req_notify_cq(cq, solicited_only);
  }
  int get_cq_event(ibv_comp_channel* ch, ibv_cq** cq, void** ctx) override {
    return lib_ ? get_cq_event_(ch, cq, ctx) : ENOSYS;
  }
  void ack_cq_events(ibv_cq* cq, unsigned int n) override { if (lib_) ack_cq_events_(cq, n); }
  ibv_qp* create_qp(ibv_pd* p, ibv_qp_init_attr* a) override { return lib_ ? create_qp_(p, a) : fail<ibv_qp*>(); }
  int modify_qp(ibv_qp* q, ibv_qp_attr* a, int mask) override { return lib_ ? modify_qp_(q, a, mask) : ENOSYS; }
  int destroy_qp(ibv_qp* q) override { return lib_ ? destroy_qp_(q) : ENOSYS; }
  int post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad) override {
    return qp->context->ops.post_send(qp, wr, bad);
  }
  int post_recv(ibv_qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad) override {
    return qp->context->ops.post_recv(qp, wr, bad);
  }
  int poll_cq(ibv_cq* cq, int n, ibv_wc* wc) override { return cq->context->ops.poll_cq(cq, n, wc); }

 private:
  template <class T>
  static T fail() {
    errno = ENOSYS;
    return nullptr;
  }
  void* lib_ = nullptr;
  std::string lib_name_;
  std::string err_;
  ibv_device** (*get_device_list_)(int*) = nullptr;
  void (*free_device_list_)(ibv_device**) = nullptr;
  const char* (*get_device_name_)(ibv_device*) = nullptr;
  ibv_context* (*open_device_)(ibv_device*) = nullptr;
  int (*close_device_)(ibv_context*) = nullptr;
  int (*query_device_)(ibv_context*, ibv_device_attr*) = nullptr;
  int (*query_port_compat_)(ibv_context*, uint8_t, struct _compat_ibv_port_attr*) = nullptr;
  int (*query_gid_)(ibv_context*, uint8_t, int, ibv_gid*) = nullptr;
  ibv_pd* (*alloc_pd_)(ibv_context*) = nullptr;
  int (*dealloc_pd_)(ibv_pd*) = nullptr;
  ibv_mr* (*reg_mr_)(ibv_pd*, void*, size_t, int) = nullptr;
  int (*dereg_mr_)(ibv_mr*) = nullptr;
  ibv_mr* (*reg_dmabuf_mr_)(ibv_pd*, uint64_t, size_t, uint64_t, int, int) = nullptr;
  ibv_comp_channel* (*create_comp_channel_)(ibv_context*) = nullptr;
  int (*destroy_comp_channel_)(ibv_comp_channel*) = nullptr;
  ibv_cq* (*create_cq_)(ibv_context*, int, void*, ibv_comp_channel*, int) = nullptr;
  int (*destroy_cq_)(ibv_cq*) = nullptr;
  int (*get_cq_event_)(ibv_comp_channel*, ibv_cq**, void**) = nullptr;
  void (*ack_cq_events_)(ibv_cq*, unsigned int) = nullptr;
  ibv_qp* (*create_qp_)(ibv_pd*, ibv_qp_init_attr*) = nullptr;
  int (*modify_qp_)(ibv_qp*, ibv_qp_attr*, int) = nullptr;
  int (*destroy_qp_)(ibv_qp*) = nullptr;
};

// ---- the fake HCA --------------------------------------------------------------------------

struct FCtx {
  ibv_context ctx;
};
struct FPd {
  ibv_pd pd;
  int children = 0;  // MRs + QPs: dealloc_pd refuses with EBUSY while any exists
};
struct FMr {
  ibv_mr mr;
  int access;
};
struct FCqe {
  ibv_wc wc;
  bool is_send;
  uint64_t seq;  // send CQE: the WR's sequence on its QP (frees queue slots when polled)
};
struct FCq {
  ibv_cq cq;
  std::deque<FCqe> q;
  int qps = 0;  // destroy_cq refuses with EBUSY while a QP uses it
};
struct FSendWr {
  uint64_t wr_id;
  ibv_wr_opcode opcode;
  bool signalled;
  uint32_t imm;  // as posted (network order)
  uint64_t raddr;
  uint32_t rkey;
  std::vector<ibv_sge> sg;
  uint64_t seq;
  bool rnr_counted = false;
};
struct FRecvWr {
  uint64_t wr_id;
  std::vector<ibv_sge> sg;
};
struct FQp {
  ibv_qp qp;
  std::string label;
  ibv_qp_cap cap{};
  bool sig_all = false;
  int access = 0;
  uint8_t rnr_retry = 0;
  uint32_t dest_qpn = 0;
  int sl = -1, tclass = -1;
  bool dead = false;
  std::deque<FSendWr> sq;
  std::deque<FRecvWr> rq;
  uint64_t next_seq = 1;  // sequence of the next posted send WR
  uint64_t retired = 0;   // every WR with seq <= retired has given its slot back
};

struct Injection {
  uint64_t remaining;  // fires when it reaches 0
  ibv_wc_status status;
  std::string filter;
};

const char* state_str(ibv_qp_state s) {
  switch (s) {
    case IBV_QPS_RESET: return "RESET";
    case IBV_QPS_INIT: return "INIT";
    case IBV_QPS_RTR: return "RTR";
    case IBV_QPS_RTS: return "RTS";
    case IBV_QPS_SQD: return "SQD";
    case IBV_QPS_SQE: return "SQE";
    case IBV_QPS_ERR: return "ERR";
    default: return "?";
  }
}

class FakeVerbs final : public VerbsApi {
 public:
  FakeVerbs() {
    std::memset(&dev_, 0, sizeof(dev_));
    dev_.node_type = IBV_NODE_CA;
    dev_.transport_type = IBV_TRANSPORT_IB;
    std::snprintf(dev_.name, sizeof(dev_.name), "fake0");
    std::snprintf(dev_.dev_name, sizeof(dev_.dev_name), "uverbs-fake0");
  }

  const char* provider() const override { return "fake"; }
  std::string load_error() const override { return {}; }

  ibv_device** get_device_list(int* n) override {
    auto** l = static_cast<ibv_device**>(std::calloc(2, sizeof(ibv_device*)));
    if (!l) return nullptr;
    l[0] = &dev_;
    if (n) *n = 1;
    return l;
  }
  void free_device_list(ibv_device** l) override { std::free(l); }
  const char* get_device_name(ibv_device* d) override { return d->name; }
  ibv_context* open_device(ibv_device* d) override {
    if (d != &dev_) return fail(ENODEV);
    auto* c = new FCtx{};
    c->ctx.device = d;
    c->ctx.cmd_fd = -1;
    c->ctx.async_fd = -1;
    c->ctx.num_comp_vectors = 1;
    return &c->ctx;
  }
  int close_device(ibv_context* c) override {
    delete reinterpret_cast<FCtx*>(c);
    return 0;
  }
  int query_device(ibv_context*, ibv_device_attr* a) override {
    std::memset(a, 0, sizeof(*a));
    std::snprintf(a->fw_ver, sizeof(a->fw_ver), "fake");
    a->max_qp = 1 << 16;
    a->max_qp_wr = kMaxQpWr;
    a->max_sge = kMaxSge;
    a->max_cq = 1 << 16;
    a->max_cqe = 1 << 20;
    a->max_mr = 1 << 20;
    a->max_mr_size = ~uint64_t{0};
    a->max_pd = 1 << 16;
    a->phys_port_cnt = 1;
    return 0;
  }
  int query_port(ibv_context*, uint8_t port, ibv_port_attr* a) override {
    if (port != 1) return EINVAL;
    std::memset(a, 0, sizeof(*a));
    a->state = IBV_PORT_ACTIVE;
    a->max_mtu = IBV_MTU_4096;
    a->active_mtu = IBV_MTU_4096;
    a->gid_tbl_len = 1;
    a->max_msg_sz = 1u << 31;
    a->lid = 1;
    a->link_layer = IBV_LINK_LAYER_ETHERNET;
    a->phys_state = 5;  // LinkUp
    return 0;
  }
  int query_gid(ibv_context*, uint8_t port, int index, ibv_gid* g) override {
    if (port != 1 || index != 0) return EINVAL;
    std::memset(g, 0, sizeof(*g));
    g->raw[0] = 0xfe;
    g->raw[1] = 0x80;
    g->raw[15] = 1;
    return 0;
  }

  ibv_pd* alloc_pd(ibv_context* c) override {
    auto* p = new FPd{};
    p->pd.context = c;
    std::lock_guard<std::mutex> g(mu_);
    p->pd.handle = next_handle_++;
    return &p->pd;
  }
  int dealloc_pd(ibv_pd* pd) override {
    auto* p = reinterpret_cast<FPd*>(pd);
    std::lock_guard<std::mutex> g(mu_);
    if (p->children) return EBUSY;
    delete p;
    return 0;
  }
  ibv_mr* reg_mr(ibv_pd* pd, void* addr, size_t len, int access) override {
    // Hardware requires local write for remote write (the HCA writes the pages).
    if ((access & IBV_ACCESS_REMOTE_WRITE) && !(access & IBV_ACCESS_LOCAL_WRITE)) return fail(EINVAL);
    auto* m = new FMr{};
    m->access = access;
    m->mr.context = pd->context;
    m->mr.pd = pd;
    m->mr.addr = addr;
    m->mr.length = len;
    std::lock_guard<std::mutex> g(mu_);
    m->mr.handle = next_handle_++;
    // Distinct key spaces so a test that swaps them is caught.
    m->mr.lkey = 0x10000000u + next_key_;
    m->mr.rkey = 0x20000000u + next_key_;
    ++next_key_;
    lkeys_[m->mr.lkey] = m;
    rkeys_[m->mr.rkey] = m;
    reinterpret_cast<FPd*>(pd)->children++;
    return &m->mr;
  }
  ibv_mr* reg_dmabuf_mr(ibv_pd* pd, uint64_t offset, size_t len, uint64_t iova, int fd, int access) override {
    if (fd < 0) return fail(EBADF);
    return reg_mr(pd, reinterpret_cast<void*>(iova), len, access);
  }
  int dereg_mr(ibv_mr* mr) override {
    auto* m = reinterpret_cast<FMr*>(mr);
    std::lock_guard<std::mutex> g(mu_);
    lkeys_.erase(mr->lkey);
    rkeys_.erase(mr->rkey);
    reinterpret_cast<FPd*>(mr->pd)->children--;
    delete m;
    return 0;
  }

  ibv_comp_channel* create_comp_channel(ibv_context*) override { return fail(ENOSYS); }
  int destroy_comp_channel(ibv_comp_channel*) override { return ENOSYS; }
  ibv_cq* create_cq(ibv_context* c, int cqe, void* cq_context, ibv_comp_channel* ch, int) override {
    if (cqe < 1 || ch) return fail(EINVAL);
    auto* q = new FCq{};
    q->cq.context = c;
    q->cq.cq_context = cq_context;
    q->cq.cqe = cqe;
    std::lock_guard<std::mutex> g(mu_);
    q->cq.handle = next_handle_++;
    return &q->cq;
  }
  int destroy_cq(ibv_cq* cq) override {
    auto* q = reinterpret_cast<FCq*>(cq);
    std::lock_guard<std::mutex> g(mu_);
    if (q->qps) return EBUSY;
    delete q;
    return 0;
  }
  int req_notify_cq(ibv_cq*, int) override { return ENOSYS; }
  int get_cq_event(ibv_comp_channel*, ibv_cq**, void**) override { return ENOSYS; }
  void ack_cq_events(ibv_cq*, unsigned int) override {}

  ibv_qp* create_qp(ibv_pd* pd, ibv_qp_init_attr* a) override {
    if (a->qp_type != IBV_QPT_RC || !a->send_cq || !a->recv_cq || a->srq) return fail(EINVAL);
    if (a->cap.max_send_wr > kMaxQpWr || a->cap.max_recv_wr > kMaxQpWr || a->cap.max_send_sge > kMaxSge ||
        a->cap.max_recv_sge > kMaxSge)
      return fail(EINVAL);
    auto* q = new FQp{};
    q->qp.context = pd->context;
    q->qp.qp_context = a->qp_context;
    q->qp.pd = pd;
    q->qp.send_cq = a->send_cq;
    q->qp.recv_cq = a->recv_cq;
    q->qp.state = IBV_QPS_RESET;
    q->qp.qp_type = IBV_QPT_RC;
    q->cap = a->cap;
    q->sig_all = a->sq_sig_all != 0;
    std::lock_guard<std::mutex> g(mu_);
    q->qp.handle = next_handle_++;
    q->qp.qp_num = next_qpn_++;
    qps_[q->qp.qp_num] = q;
    reinterpret_cast<FPd*>(pd)->children++;
    reinterpret_cast<FCq*>(a->send_cq)->qps++;
    reinterpret_cast<FCq*>(a->recv_cq)->qps++;
    if (!nic_started_) {
      nic_started_ = true;
      // Detached and never joined: the fake lives for the whole process (it is never
      // destroyed, see verbs_api()), and the thread only sleeps when there is no work.
      std::thread([this] { nic_loop(); }).detach();
    }
    return &q->qp;
  }

  int modify_qp(ibv_qp* qp, ibv_qp_attr* a, int mask) override {
    auto* q = reinterpret_cast<FQp*>(qp);
    std::lock_guard<std::mutex> g(mu_);
    if (!(mask & IBV_QP_STATE)) return EINVAL;
    ibv_qp_state from = qp->state, to = a->qp_state;
    auto need = [&](int m) { return (mask & m) == m; };
    switch (to) {
      case IBV_QPS_RESET:
        // Discards every queued WR without completions.
        q->sq.clear();
        q->rq.clear();
        q->retired = q->next_seq - 1;
        q->dest_qpn = 0;
        break;
      case IBV_QPS_INIT:
        if (from != IBV_QPS_RESET && from != IBV_QPS_INIT) return EINVAL;
        if (from == IBV_QPS_RESET && !need(IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)) return EINVAL;
        if ((mask & IBV_QP_PORT) && a->port_num != 1) return EINVAL;
        if (mask & IBV_QP_ACCESS_FLAGS) q->access = a->qp_access_flags;
        break;
      case IBV_QPS_RTR: {
        if (from != IBV_QPS_INIT) return EINVAL;
        if (!need(IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
                  IBV_QP_MIN_RNR_TIMER))
          return EINVAL;
        if (a->ah_attr.port_num != 1) return EINVAL;
        q->dest_qpn = a->dest_qp_num;
        q->sl = a->ah_attr.sl;
        q->tclass = a->ah_attr.is_global ? a->ah_attr.grh.traffic_class : -1;
        break;
      }
      case IBV_QPS_RTS:
        if (from != IBV_QPS_RTR && from != IBV_QPS_RTS) return EINVAL;
        if (from == IBV_QPS_RTR &&
            !need(IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC))
          return EINVAL;
        if (mask & IBV_QP_RNR_RETRY) q->rnr_retry = a->rnr_retry;
        break;
      case IBV_QPS_ERR:
        qp->state = IBV_QPS_ERR;
        flush_locked(q);
        return 0;
      default:
        return EINVAL;
    }
    qp->state = to;
    if (to == IBV_QPS_RTS) cv_.notify_all();
    return 0;
  }

  int destroy_qp(ibv_qp* qp) override {
    auto* q = reinterpret_cast<FQp*>(qp);
    std::lock_guard<std::mutex> g(mu_);
    qps_.erase(qp->qp_num);
    reinterpret_cast<FPd*>(qp->pd)->children--;
    reinterpret_cast<FCq*>(qp->send_cq)->qps--;
    reinterpret_cast<FCq*>(qp->recv_cq)->qps--;
    delete q;
    return 0;
  }

  int post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad) override {
    auto* q = reinterpret_cast<FQp*>(qp);
    std::lock_guard<std::mutex> g(mu_);
    c_.post_send_calls++;
    if (qp->state != IBV_QPS_RTS) {
      *bad = wr;
      return EINVAL;
    }
    int64_t n = 0;
    for (ibv_send_wr* w = wr; w; w = w->next) {
      uint64_t used = (q->next_seq - 1) - q->retired;
      if (used >= q->cap.max_send_wr) {
        *bad = w;
        note_chain(n);
        return ENOMEM;
      }
      if ((w->opcode != IBV_WR_RDMA_WRITE && w->opcode != IBV_WR_RDMA_WRITE_WITH_IMM) || w->num_sge < 0 ||
          static_cast<uint32_t>(w->num_sge) > q->cap.max_send_sge) {
        *bad = w;
        note_chain(n);
        return EINVAL;
      }
      FSendWr f;
      f.wr_id = w->wr_id;
      f.opcode = w->opcode;
      f.signalled = q->sig_all || (w->send_flags & IBV_SEND_SIGNALED);
      f.imm = w->imm_data;
      f.raddr = w->wr.rdma.remote_addr;
      f.rkey = w->wr.rdma.rkey;
      f.sg.assign(w->sg_list, w->sg_list + w->num_sge);
      f.seq = q->next_seq++;
      if (f.signalled) c_.signalled_wrs++;
      q->sq.push_back(std::move(f));
      ++n;
    }
    note_chain(n);
    cv_.notify_all();
    return 0;
  }

  int post_recv(ibv_qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad) override {
    auto* q = reinterpret_cast<FQp*>(qp);
    std::lock_guard<std::mutex> g(mu_);
    for (ibv_recv_wr* w = wr; w; w = w->next) {
      if (qp->state == IBV_QPS_RESET || qp->state == IBV_QPS_ERR || q->rq.size() >= q->cap.max_recv_wr ||
          w->num_sge < 0 || static_cast<uint32_t>(w->num_sge) > q->cap.max_recv_sge) {
        *bad = w;
        return qp->state == IBV_QPS_RESET || qp->state == IBV_QPS_ERR ? EINVAL : ENOMEM;
      }
      q->rq.push_back(FRecvWr{w->wr_id, std::vector<ibv_sge>(w->sg_list, w->sg_list + w->num_sge)});
    }
    cv_.notify_all();  // a WITH_IMM may be waiting for this recv
    return 0;
  }

  int poll_cq(ibv_cq* cq, int n, ibv_wc* wc) override {
    auto* c = reinterpret_cast<FCq*>(cq);
    std::lock_guard<std::mutex> g(mu_);
    int k = 0;
    while (k < n && !c->q.empty()) {
      FCqe& e = c->q.front();
      wc[k++] = e.wc;
      if (e.is_send) {
        // The provider learns here that the HCA is done with every WR up to this one.
        auto it = qps_.find(e.wc.qp_num);
        if (it != qps_.end() && e.seq > it->second->retired) it->second->retired = e.seq;
      }
      c->q.pop_front();
    }
    return k;
  }

  void label_qp(ibv_qp* qp, const std::string& label) override {
    std::lock_guard<std::mutex> g(mu_);
    reinterpret_cast<FQp*>(qp)->label = label;
  }

  // -- test controls --
  void reset() {
    std::lock_guard<std::mutex> g(mu_);
    c_ = fake::Counters{};
    inj_.clear();
    stalled_ = false;
    for (auto& kv : qps_) kv.second->dead = false;
    cv_.notify_all();
  }
  void inject(uint64_t nth, ibv_wc_status st, const std::string& filter) {
    std::lock_guard<std::mutex> g(mu_);
    inj_.push_back(Injection{nth, st, filter});
  }
  void stall(bool on) {
    std::lock_guard<std::mutex> g(mu_);
    stalled_ = on;
    cv_.notify_all();
  }
  int kill(const std::string& filter) {
    std::lock_guard<std::mutex> g(mu_);
    int n = 0;
    for (auto& kv : qps_)
      if (kv.second->label.find(filter) != std::string::npos) {
        kv.second->dead = true;
        ++n;
      }
    cv_.notify_all();
    return n;
  }
  fake::Counters counters() {
    std::lock_guard<std::mutex> g(mu_);
    fake::Counters c = c_;
    for (auto& kv : qps_) {
      FQp* q = kv.second;
      fake::QpInfo i;
      i.qpn = q->qp.qp_num;
      i.label = q->label;
      i.state = state_str(q->qp.state);
      i.sl = q->sl;
      i.traffic_class = q->tclass;
      i.dest_qpn = q->dest_qpn;
      i.outstanding = static_cast<int64_t>((q->next_seq - 1) - q->retired);
      i.dead = q->dead;
      c.qps.push_back(std::move(i));
    }
    return c;
  }

 private:
  static constexpr uint32_t kMaxQpWr = 16384;
  static constexpr uint32_t kMaxSge = 16;

  static std::nullptr_t fail(int e) {
    errno = e;
    return nullptr;
  }
  void note_chain(int64_t n) {
    c_.wrs_posted += n;
    c_.longest_chain = std::max(c_.longest_chain, n);
  }

  void push_cqe(FQp* q, ibv_cq* cq, const ibv_wc& wc, bool is_send, uint64_t seq) {
    auto* c = reinterpret_cast<FCq*>(cq);
    if (c->q.size() >= static_cast<size_t>(c->cq.cqe)) {
      // A real HCA reports CQ overrun as an async event and the QP can no longer complete.
      c_.cq_overflows++;
      if (q->qp.state != IBV_QPS_ERR) {
        q->qp.state = IBV_QPS_ERR;
        flush_locked(q);
      }
      return;
    }
    c->q.push_back(FCqe{wc, is_send, seq});
    if (is_send) c_.send_cqes++;
    else c_.recv_cqes++;
    if (wc.status != IBV_WC_SUCCESS) c_.error_cqes++;
  }

  static ibv_wc make_wc(uint64_t wr_id, ibv_wc_status st, ibv_wc_opcode op, uint32_t qpn) {
    ibv_wc wc;
    std::memset(&wc, 0, sizeof(wc));
    wc.wr_id = wr_id;
    wc.status = st;
    wc.opcode = op;
    wc.qp_num = qpn;
    return wc;
  }

  // Every queued WR of q completes with IBV_WC_WR_FLUSH_ERR, signalled or not.
  void flush_locked(FQp* q) {
    while (!q->sq.empty()) {
      FSendWr& w = q->sq.front();
      push_cqe(q, q->qp.send_cq, make_wc(w.wr_id, IBV_WC_WR_FLUSH_ERR, IBV_WC_RDMA_WRITE, q->qp.qp_num), true, w.seq);
      q->sq.pop_front();
    }
    while (!q->rq.empty()) {
      push_cqe(q, q->qp.recv_cq, make_wc(q->rq.front().wr_id, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, q->qp.qp_num), false, 0);
      q->rq.pop_front();
    }
  }

  FMr* find_mr(std::map<uint32_t, FMr*>& m, uint32_t key, ibv_pd* pd, uint64_t addr, uint64_t len) {
    auto it = m.find(key);
    if (it == m.end() || it->second->mr.pd != pd) return nullptr;
    uint64_t base = reinterpret_cast<uintptr_t>(it->second->mr.addr);
    if (addr < base || len > it->second->mr.length || addr - base > it->second->mr.length - len) return nullptr;
    return it->second;
  }

  enum class Exec { kDone, kWait };

  // Executes the head WR of q. Called with mu_ held.
  Exec execute_head(FQp* q) {
    FSendWr& w = q->sq.front();
    ibv_wc_status st = IBV_WC_SUCCESS;
    for (auto& inj : inj_) {
      if (inj.remaining == 0 || q->label.find(inj.filter) == std::string::npos) continue;
      if (--inj.remaining == 0) {
        st = inj.status;
        c_.injected++;
        break;
      }
    }
    uint64_t len = 0;
    FQp* r = nullptr;
    if (st == IBV_WC_SUCCESS) {
      for (auto& s : w.sg) {
        if (s.length && !find_mr(lkeys_, s.lkey, q->qp.pd, s.addr, s.length)) st = IBV_WC_LOC_PROT_ERR;
        len += s.length;
      }
    }
    if (st == IBV_WC_SUCCESS) {
      auto it = qps_.find(q->dest_qpn);
      r = it == qps_.end() ? nullptr : it->second;
      if (!r || r->dead || (r->qp.state != IBV_QPS_RTR && r->qp.state != IBV_QPS_RTS) ||
          r->dest_qpn != q->qp.qp_num)
        st = IBV_WC_RETRY_EXC_ERR;
    }
    if (st == IBV_WC_SUCCESS && len) {
      FMr* m = find_mr(rkeys_, w.rkey, r->qp.pd, w.raddr, len);
      if (!m || !(m->access & IBV_ACCESS_REMOTE_WRITE) || !(r->access & IBV_ACCESS_REMOTE_WRITE))
        st = IBV_WC_REM_ACCESS_ERR;
    }
    if (st == IBV_WC_SUCCESS && w.opcode == IBV_WR_RDMA_WRITE_WITH_IMM && r->rq.empty()) {
      if (q->rnr_retry == 7) {
        if (!w.rnr_counted) c_.rnr_waits++;
        w.rnr_counted = true;
        return Exec::kWait;
      }
      st = IBV_WC_RNR_RETRY_EXC_ERR;
    }
    if (st != IBV_WC_SUCCESS) {
      push_cqe(q, q->qp.send_cq, make_wc(w.wr_id, st, IBV_WC_RDMA_WRITE, q->qp.qp_num), true, w.seq);
      q->sq.pop_front();
      q->qp.state = IBV_QPS_ERR;
      flush_locked(q);
      return Exec::kDone;
    }
    auto* dst = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(w.raddr));
    for (auto& s : w.sg) {
      if (!s.length) continue;
      std::memcpy(dst, reinterpret_cast<const void*>(static_cast<uintptr_t>(s.addr)), s.length);
      dst += s.length;
    }
    c_.bytes_written += static_cast<int64_t>(len);
    if (w.opcode == IBV_WR_RDMA_WRITE_WITH_IMM) {
      FRecvWr rv = std::move(r->rq.front());
      r->rq.pop_front();
      ibv_wc wc = make_wc(rv.wr_id, IBV_WC_SUCCESS, IBV_WC_RECV_RDMA_WITH_IMM, r->qp.qp_num);
      wc.wc_flags = IBV_WC_WITH_IMM;
      wc.imm_data = w.imm;
      wc.byte_len = static_cast<uint32_t>(len);
      wc.src_qp = q->qp.qp_num;
      push_cqe(r, r->qp.recv_cq, wc, false, 0);
    }
    if (w.signalled)
      push_cqe(q, q->qp.send_cq, make_wc(w.wr_id, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, q->qp.qp_num), true, w.seq);
    q->sq.pop_front();
    return Exec::kDone;
  }

  void nic_loop() {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      bool did = false, waiting = false;
      if (!stalled_) {
        // Round-robin over QPs, a bounded burst each, so one busy QP does not starve others.
        for (auto& kv : qps_) {
          FQp* q = kv.second;
          for (int burst = 0; burst < 64 && !q->dead && q->qp.state == IBV_QPS_RTS && !q->sq.empty(); ++burst) {
            if (execute_head(q) == Exec::kWait) {
              waiting = true;
              break;
            }
            did = true;
          }
        }
      }
      if (did) continue;
      // A WR waiting for a recv (RNR) is retried on post_recv's notify or after a short
      // interval, like the hardware's RNR timer.
      if (waiting) cv_.wait_for(lk, std::chrono::milliseconds(1));
      else cv_.wait_for(lk, std::chrono::milliseconds(50));
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  ibv_device dev_;
  uint32_t next_handle_ = 1, next_key_ = 1, next_qpn_ = 0x100;
  std::map<uint32_t, FQp*> qps_;
  std::map<uint32_t, FMr*> lkeys_, rkeys_;
  std::vector<Injection> inj_;
  bool stalled_ = false;
  bool nic_started_ = false;
  fake::Counters c_;
};

// Both providers are created once and never destroyed: objects made through them may outlive
// static destruction (threads, Python finalisation order).
FakeVerbs& fake_provider() {
  static FakeVerbs* f = new FakeVerbs();
  return *f;
}
RealVerbs& real_provider() {
  static RealVerbs* r = new RealVerbs();
  return *r;
}

std::atomic<int> g_provider{-1};  // -1 not chosen yet, 0 real, 1 fake
std::atomic<size_t> g_chunk{size_t{1} << 30};  // 1 GiB

}  // namespace

VerbsApi& verbs_api() {
  int p = g_provider.load(std::memory_order_acquire);
  if (p < 0) {
    const char* e = std::getenv("DPMOVE_VERBS");
    int want = (e && std::strcmp(e, "fake") == 0) ? 1 : 0;
    g_provider.compare_exchange_strong(p, want);
    p = g_provider.load(std::memory_order_acquire);
  }
  if (p == 1) return fake_provider();
  return real_provider();
}

void set_verbs_provider(const std::string& name) {
  if (name == "fake") g_provider.store(1);
  else if (name == "real" || name == "libibverbs") g_provider.store(0);
  else throw UsageError("verbs provider must be 'fake' or 'real', got '" + name + "'");
}

size_t reg_chunk_bytes() noexcept { return g_chunk.load(std::memory_order_relaxed); }
void set_reg_chunk_bytes(size_t n) {
  if (n == 0 || n > (size_t{1} << 30))
    throw UsageError("verbs registration chunk must be 1 byte .. 1 GiB, got " + std::to_string(n));
  g_chunk.store(n, std::memory_order_relaxed);
}

const char* wc_status_name(int s) noexcept {
  switch (s) {
#define DPMOVE_WC(x) \
  case x: return #x;
    DPMOVE_WC(IBV_WC_SUCCESS)
    DPMOVE_WC(IBV_WC_LOC_LEN_ERR)
    DPMOVE_WC(IBV_WC_LOC_QP_OP_ERR)
    DPMOVE_WC(IBV_WC_LOC_EEC_OP_ERR)
    DPMOVE_WC(IBV_WC_LOC_PROT_ERR)
    DPMOVE_WC(IBV_WC_WR_FLUSH_ERR)
    DPMOVE_WC(IBV_WC_MW_BIND_ERR)
    DPMOVE_WC(IBV_WC_BAD_RESP_ERR)
    DPMOVE_WC(IBV_WC_LOC_ACCESS_ERR)
    DPMOVE_WC(IBV_WC_REM_INV_REQ_ERR)
    DPMOVE_WC(IBV_WC_REM_ACCESS_ERR)
    DPMOVE_WC(IBV_WC_REM_OP_ERR)
    DPMOVE_WC(IBV_WC_RETRY_EXC_ERR)
    DPMOVE_WC(IBV_WC_RNR_RETRY_EXC_ERR)
    DPMOVE_WC(IBV_WC_LOC_RDD_VIOL_ERR)
    DPMOVE_WC(IBV_WC_REM_INV_RD_REQ_ERR)
    DPMOVE_WC(IBV_WC_REM_ABORT_ERR)
    DPMOVE_WC(IBV_WC_INV_EECN_ERR)
    DPMOVE_WC(IBV_WC_INV_EEC_STATE_ERR)
    DPMOVE_WC(IBV_WC_FATAL_ERR)
    DPMOVE_WC(IBV_WC_RESP_TIMEOUT_ERR)
    DPMOVE_WC(IBV_WC_GENERAL_ERR)
    DPMOVE_WC(IBV_WC_TM_ERR)
    DPMOVE_WC(IBV_WC_TM_RNDV_INCOMPLETE)
#undef DPMOVE_WC
    default: return "IBV_WC_(unknown)";
  }
}

const char* wc_status_text(int s) noexcept {
  switch (s) {
    case IBV_WC_SUCCESS: return "success";
    case IBV_WC_LOC_LEN_ERR: return "local length error";
    case IBV_WC_LOC_QP_OP_ERR: return "local QP operation error";
    case IBV_WC_LOC_PROT_ERR: return "local protection error (bad lkey or bounds)";
    case IBV_WC_WR_FLUSH_ERR: return "flushed: an earlier work request on the queue pair failed";
    case IBV_WC_BAD_RESP_ERR: return "bad response";
    case IBV_WC_LOC_ACCESS_ERR: return "local access error";
    case IBV_WC_REM_INV_REQ_ERR: return "remote invalid request";
    case IBV_WC_REM_ACCESS_ERR: return "remote access error (bad rkey, bounds or permission)";
    case IBV_WC_REM_OP_ERR: return "remote operation error";
    case IBV_WC_RETRY_EXC_ERR: return "transport retry counter exceeded (peer unreachable)";
    case IBV_WC_RNR_RETRY_EXC_ERR: return "receiver not ready retry counter exceeded (no receive posted)";
    case IBV_WC_REM_ABORT_ERR: return "remote aborted";
    case IBV_WC_FATAL_ERR: return "fatal device error";
    case IBV_WC_RESP_TIMEOUT_ERR: return "response timeout";
    case IBV_WC_GENERAL_ERR: return "general error";
    default: return "work completion error";
  }
}

namespace fake {
void reset() { fake_provider().reset(); }
void inject(uint64_t nth, ibv_wc_status status, const std::string& f) {
  if (nth == 0) throw UsageError("fake verbs injection: nth is 1-based, got 0");
  fake_provider().inject(nth, status, f);
}
void stall(bool on) { fake_provider().stall(on); }
int kill_qp(const std::string& f) { return fake_provider().kill(f); }
Counters counters() { return fake_provider().counters(); }
}  // namespace fake

}  // namespace verbs
}  // namespace dpmove
