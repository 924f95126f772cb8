// The libibverbs calls the verbs transport makes, behind one interface with two providers.
//
//   RealVerbs - libibverbs loaded at run time with dlopen("libibverbs.so.1"); the module never
//               links it, so `import dpmove` works where rdma-core is absent. The data-path
//               calls that verbs.h defines static-inline (post_send, post_recv, poll_cq,
//               req_notify_cq) dispatch through the context's ops table, as the header does.
//   FakeVerbs - an in-process software HCA and fabric for tests: process-global, so two Engines
//               in one process talk RC queue pairs to each other. See verbs_api.cc for what it
//               models and what it does not.
//
// Conventions are libibverbs': functions returning a pointer return nullptr and set errno;
// functions returning int return 0 or a positive errno, except poll_cq (>= 0 completions, or
// < 0) and get_device_list (nullptr + errno). Every object must be released through the
// provider that created it. Thread safety: as libibverbs (the fake serialises internally).
#pragma once

#include <infiniband/verbs.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace dpmove {
namespace verbs {

class VerbsApi {
 public:
  virtual ~VerbsApi() = default;
  virtual const char* provider() const = 0;  // "libibverbs" or "fake"
  // Empty when the provider can be used at all (library loaded); else why not. Whether a
  // device exists is a separate question (get_device_list).
  virtual std::string load_error() const = 0;

  virtual ibv_device** get_device_list(int* num_devices) = 0;
  virtual void free_device_list(ibv_device** list) = 0;
  virtual const char* get_device_name(ibv_device* dev) = 0;
  virtual ibv_context* open_device(ibv_device* dev) = 0;
  virtual int close_device(ibv_context* ctx) = 0;
  virtual int query_device(ibv_context* ctx, ibv_device_attr* attr) = 0;
  virtual int query_port(ibv_context* ctx, uint8_t port, ibv_port_attr* attr) = 0;
  virtual int query_gid(ibv_context* ctx, uint8_t port, int index, ibv_gid* gid) = 0;

  virtual ibv_pd* alloc_pd(ibv_context* ctx) = 0;
  virtual int dealloc_pd(ibv_pd* pd) = 0;
  virtual ibv_mr* reg_mr(ibv_pd* pd, void* addr, size_t length, int access) = 0;
  virtual int dereg_mr(ibv_mr* mr) = 0;
  // ibv_reg_dmabuf_mr (rdma-core 34+): registers [offset, offset + length) of dma-buf `fd`,
  // addressed by the HCA as `iova`. nullptr + errno = EOPNOTSUPP where libibverbs lacks it.
  // The fake registers iova as a host address (its device memory is host memory).
  virtual ibv_mr* reg_dmabuf_mr(ibv_pd* pd, uint64_t offset, size_t length, uint64_t iova, int fd, int access) = 0;

  // nullptr with errno = ENOSYS when the provider has no completion channels (the fake):
  // callers then poll.
  virtual ibv_comp_channel* create_comp_channel(ibv_context* ctx) = 0;
  virtual int destroy_comp_channel(ibv_comp_channel* ch) = 0;
  virtual ibv_cq* create_cq(ibv_context* ctx, int cqe, void* cq_context, ibv_comp_channel* ch, int comp_vector) = 0;
  virtual int destroy_cq(ibv_cq* cq) = 0;
  virtual int req_notify_cq(ibv_cq* cq, int solicited_only) = 0;
  virtual int get_cq_event(ibv_comp_channel* ch, ibv_cq** cq, void** cq_context) = 0;
  virtual void ack_cq_events(ibv_cq* cq, unsigned int nevents) = 0;

  virtual ibv_qp* create_qp(ibv_pd* pd, ibv_qp_init_attr* attr) = 0;
  virtual int modify_qp(ibv_qp* qp, ibv_qp_attr* attr, int attr_mask) = 0;
  virtual int destroy_qp(ibv_qp* qp) = 0;

  virtual int post_send(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad_wr) = 0;
  virtual int post_recv(ibv_qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad_wr) = 0;
  virtual int poll_cq(ibv_cq* cq, int num_entries, ibv_wc* wc) = 0;

  // A name for the QP in test counters and fault injection (the fake); no-op on hardware.
  virtual void label_qp(ibv_qp* qp, const std::string& label) {}
};

// The process's provider: the fake when DPMOVE_VERBS=fake was set at first use or
// set_verbs_provider("fake") was called, else libibverbs. Never null.
VerbsApi& verbs_api();
// "fake" or "real" (libibverbs). Affects objects created afterwards; objects already created
// keep the provider they were made with (callers hold the VerbsApi& they used).
// Throws UsageError for other names.
void set_verbs_provider(const std::string& name);

// "IBV_WC_REM_ACCESS_ERR"-style symbolic name and a short description.
const char* wc_status_name(int status) noexcept;
const char* wc_status_text(int status) noexcept;

// Registration chunk size (bytes) for the transport's memory regions; default 1 GiB, tests
// lower it to exercise WRs that split at chunk boundaries. Must be > 0; read at registration.
size_t reg_chunk_bytes() noexcept;
void set_reg_chunk_bytes(size_t n);

// ---- fake provider controls (tests) --------------------------------------------------------
namespace fake {

// Resets counters, injections, kills and the stall. Objects that exist stay.
void reset();
// The nth send WR executed from now on (1-based, counting across all QPs whose label
// contains `label_filter`, every QP when empty) completes with `status` instead of running.
void inject(uint64_t nth, ibv_wc_status status, const std::string& label_filter);
// While stalled the NIC executes nothing (WRs stay queued; deadlines then expire).
void stall(bool on);
// Marks every QP whose label contains `label_filter` dead: WRs aimed at it complete with
// IBV_WC_RETRY_EXC_ERR at the sender, as if its host vanished. Returns how many QPs matched.
int kill_qp(const std::string& label_filter);

struct QpInfo {
  uint32_t qpn;
  std::string label;
  std::string state;
  int sl = -1, traffic_class = -1;  // seen at the last INIT->RTR; -1 before
  uint32_t dest_qpn = 0;
  int64_t outstanding = 0;          // send WRs occupying the send queue
  bool dead = false;
};
struct Counters {
  int64_t post_send_calls = 0;  // doorbells
  int64_t wrs_posted = 0;
  int64_t longest_chain = 0;
  int64_t signalled_wrs = 0;
  int64_t send_cqes = 0;        // completions generated on send CQs (errors included)
  int64_t recv_cqes = 0;
  int64_t error_cqes = 0;       // status != success, flushes included
  int64_t bytes_written = 0;
  int64_t rnr_waits = 0;        // WITH_IMM WRs that found no posted recv and waited (rnr_retry 7)
  int64_t cq_overflows = 0;
  int64_t injected = 0;         // injections that fired
  std::vector<QpInfo> qps;      // live QPs
};
Counters counters();

}  // namespace fake

}  // namespace verbs
}  // namespace dpmove
