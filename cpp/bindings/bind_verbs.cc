// Private hooks of the verbs transport for tests: provider choice, the fake HCA's fault
// injection and counters, the registration chunk size. Not part of the public API.
#include <cstring>

#include "common.h"
#include "dpmove/net.h"
#include "dpmove/verbs_api.h"

namespace dpmove {

namespace {

// "IBV_WC_REM_ACCESS_ERR" (or "REM_ACCESS_ERR") or the enum's integer value.
ibv_wc_status parse_status(const py::object& s) {
  if (py::isinstance<py::int_>(s)) {
    int v = py::cast<int>(s);
    if (v <= IBV_WC_SUCCESS || v > IBV_WC_TM_RNDV_INCOMPLETE)
      throw py::value_error("work completion status must be an error status (1.." +
                            std::to_string(static_cast<int>(IBV_WC_TM_RNDV_INCOMPLETE)) + "), got " + std::to_string(v));
    return static_cast<ibv_wc_status>(v);
  }
  std::string name = py::cast<std::string>(s);
  for (int v = IBV_WC_LOC_LEN_ERR; v <= IBV_WC_TM_RNDV_INCOMPLETE; ++v) {
    std::string n = verbs::wc_status_name(v);
    if (n == name || n == "IBV_WC_" + name) return static_cast<ibv_wc_status>(v);
  }
  throw py::value_error("unknown work completion status '" + name + "' (expected e.g. 'IBV_WC_REM_ACCESS_ERR')");
}

}  // namespace

void bind_verbs(py::module_& m) {
  net::install_verbs_control_handler();

  m.def("_verbs_set_provider", [](const std::string& name) { verbs::set_verbs_provider(name); }, py::arg("name"),
        "Use the in-process fake HCA ('fake') or libibverbs ('real') for verbs objects created from now on");
  m.def("_verbs_provider", [] { return std::string(verbs::verbs_api().provider()); });
  m.def("_verbs_set_chunk_bytes", [](int64_t n) {
    if (n <= 0) throw py::value_error("chunk bytes must be > 0");
    verbs::set_reg_chunk_bytes(static_cast<size_t>(n));
  }, py::arg("nbytes"), "Registration chunk size for verbs memory regions registered from now on (default 1 GiB)");
  m.def("_verbs_chunk_bytes", [] { return static_cast<int64_t>(verbs::reg_chunk_bytes()); });
  m.def("_verbs_wc_status", [](const py::object& s) { return static_cast<int>(parse_status(s)); }, py::arg("status"));
  m.def("_verbs_wc_status_name", [](int s) { return std::string(verbs::wc_status_name(s)); }, py::arg("status"));

  m.def("_verbs_fake_reset", [] { verbs::fake::reset(); }, "Reset the fake HCA's counters, injections, kills and stall");
  m.def("_verbs_fake_inject", [](int64_t nth, const py::object& status, const std::string& qp) {
    if (nth < 1) throw py::value_error("nth is 1-based, got " + std::to_string(nth));
    verbs::fake::inject(static_cast<uint64_t>(nth), parse_status(status), qp);
  }, py::arg("nth"), py::arg("status"), py::arg("qp") = "",
     "The nth send WR executed from now on, on QPs whose label contains `qp`, completes with `status`");
  m.def("_verbs_fake_stall", [](bool on) { verbs::fake::stall(on); }, py::arg("on"));
  m.def("_verbs_fake_kill_qp", [](const std::string& label) { return verbs::fake::kill_qp(label); }, py::arg("label"),
        "Mark QPs whose label contains `label` dead (their peers' WRs then fail with IBV_WC_RETRY_EXC_ERR); returns how many");
  m.def("_verbs_fake_counters", [] {
    verbs::fake::Counters c = verbs::fake::counters();
    py::dict d;
    d["post_send_calls"] = c.post_send_calls;
    d["wrs_posted"] = c.wrs_posted;
    d["longest_chain"] = c.longest_chain;
    d["signalled_wrs"] = c.signalled_wrs;
    d["send_cqes"] = c.send_cqes;
    d["recv_cqes"] = c.recv_cqes;
    d["error_cqes"] = c.error_cqes;
    d["bytes_written"] = c.bytes_written;
    d["rnr_waits"] = c.rnr_waits;
    d["cq_overflows"] = c.cq_overflows;
    d["injected"] = c.injected;
    py::list qps;
    for (auto& q : c.qps) {
      py::dict x;
      x["qpn"] = q.qpn;
      x["label"] = q.label;
      x["state"] = q.state;
      x["sl"] = q.sl;
      x["traffic_class"] = q.traffic_class;
      x["dest_qpn"] = q.dest_qpn;
      x["outstanding"] = q.outstanding;
      x["dead"] = q.dead;
      qps.append(x);
    }
    d["qps"] = qps;
    return d;
  }, "Counters of the fake HCA since the last reset, and its live QPs");
}

}  // namespace dpmove
