// Python surface of the traffic-class arbiter (pure logic: every call takes the time).
#include <chrono>

#include "common.h"
#include "dpmove/qos.h"
#include "dpmove/qos_gate.h"
#include "dpmove/request.h"

namespace dpmove {

qos::ClassConfig qos_class_from(const py::handle& d) {
  auto m = d.cast<py::dict>();
  qos::ClassConfig c;
  c.name = m["name"].cast<std::string>();
  c.level = m["level"].cast<int>();
  c.weight = m["weight"].cast<uint32_t>();
  c.rate_bps = m["rate_bps"].cast<double>();
  c.burst_bytes = m["burst_bytes"].cast<uint64_t>();
  c.ib_sl = m["ib_sl"].cast<uint8_t>();
  c.roce_tclass = m["roce_tclass"].cast<uint8_t>();
  return c;
}

py::dict qos_stats_dict(const qos::ClassStats& s) {
  py::dict d;
  d["bytes"] = s.bytes;
  d["ops"] = s.ops;
  d["queued"] = s.queued;
  d["starvation_grants"] = s.starvation_grants;
  d["throttled_ns"] = s.throttled_ns;
  d["wait_p50_ns"] = s.wait_p50_ns;
  d["wait_p99_ns"] = s.wait_p99_ns;
  d["wait_max_ns"] = s.wait_max_ns;
  return d;
}

namespace {
// Finishes every entry it is handed at once: what is left to time is the gate and the
// request's QoS accounting.
struct NullSink final : qos::Sink {
  void dispatch(const std::shared_ptr<Request>& req, size_t begin, size_t end, const std::shared_ptr<void>&) override {
    for (size_t i = begin; i < end; ++i)
      if (req->start(i)) req->finish(i, 0, req->entry(i).length);
  }
};
}  // namespace

void bind_qos(py::module_& m) {
  py::class_<qos::Arbiter>(m, "QosArbiter", R"doc(
Traffic-class arbiter as pure logic: strict priority between levels, a starvation bound,
deficit round robin by bytes within a level, token-bucket rate limits. Every call takes the
current time in ns, so a test replays exact arrival sequences. Built by dpmove.qos.QosConfig.
)doc")
      .def(py::init([](const py::list& classes, int64_t bound_ns, uint64_t quantum) {
             std::vector<qos::ClassConfig> v;
             for (auto c : classes) v.push_back(qos_class_from(c));
             return std::make_unique<qos::Arbiter>(std::move(v), bound_ns, quantum);
           }),
           py::arg("classes"), py::arg("starvation_bound_ns"), py::arg("quantum_bytes"))
      .def("find", &qos::Arbiter::find, py::arg("name"))
      .def_property_readonly("num_classes", &qos::Arbiter::num_classes)
      .def_property_readonly("queued", &qos::Arbiter::queued)
      .def("enqueue", &qos::Arbiter::enqueue, py::arg("cls"), py::arg("op"), py::arg("nbytes"), py::arg("now_ns"))
      .def("dequeue", [](qos::Arbiter& a, int64_t now) -> py::object {
        qos::Grant g;
        if (!a.dequeue(now, &g)) return py::none();
        return py::make_tuple(g.cls, g.op, g.bytes, g.waited_ns);
      }, py::arg("now_ns"), "(class, op, bytes, waited_ns) of the next operation, or None when none is eligible")
      .def("next_eligible", &qos::Arbiter::next_eligible, py::arg("now_ns"),
           "earliest time a rate-limited class with work becomes eligible (2**63-1: none waits for tokens)")
      .def("stats", [](const qos::Arbiter& a, int c) { return qos_stats_dict(a.stats(c)); }, py::arg("cls"));

  // Cost of one enqueue + dequeue with `nclasses` busy classes, in ns per operation, measured
  // in C++ (no Python in the loop).
  m.def("_qos_microbench", [](const py::list& classes, int64_t ops) {
    std::vector<qos::ClassConfig> v;
    for (auto c : classes) v.push_back(qos_class_from(c));
    py::gil_scoped_release nogil;
    qos::Arbiter a(v, int64_t{1} << 40, 64 * 1024);
    int n = static_cast<int>(v.size());
    int64_t now = 0;
    for (int i = 0; i < 64; ++i) a.enqueue(i % n, static_cast<uint64_t>(i), 4096u << (i % 4), now);
    qos::Grant g;
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < ops; ++i) {
      now += 100;
      a.dequeue(now, &g);
      a.enqueue(g.cls, static_cast<uint64_t>(i), g.bytes, now);
    }
    auto dt = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    return dt / static_cast<double>(ops);
  }, py::arg("classes"), py::arg("ops"));

  // Cost of one operation through a Gate (QoS on, no windows): submit, arbitration, dispatch
  // to a sink that finishes the entry at once, and the release of its bytes; ns per operation.
  // Requests (one 4 KiB entry each) are built before the clock starts.
  m.def("_qos_gate_microbench", [](const py::list& classes, int64_t ops) {
    qos::GateOptions o;
    for (auto c : classes) o.classes.push_back(qos_class_from(c));
    py::gil_scoped_release nogil;
    auto gate = std::make_shared<qos::Gate>("bench", o);
    auto sink = std::make_shared<NullSink>();
    std::vector<std::shared_ptr<Request>> reqs;
    reqs.reserve(static_cast<size_t>(ops));
    for (int64_t i = 0; i < ops; ++i)
      reqs.push_back(std::make_shared<Request>(static_cast<uint64_t>(i), OpKind::kRead, nullptr, nullptr,
                                               std::vector<IoEntry>{{0, 0, 4096}}, INT64_MAX, false));
    int n = static_cast<int>(o.classes.size());
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < ops; ++i) gate->submit(reqs[static_cast<size_t>(i)], static_cast<int>(i % n), sink, nullptr, false);
    auto dt = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    gate->close();
    return dt / static_cast<double>(ops);
  }, py::arg("classes"), py::arg("ops"));
}

}  // namespace dpmove
