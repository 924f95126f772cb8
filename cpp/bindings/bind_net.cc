// Python surface of one-sided writes: Engine.metadata/expose/connect/next_notification,
// Peer, RemoteRegion, Notification, parse_metadata.
#include <Python.h>

#include <climits>

#include "common.h"
#include "dpmove/engine.h"
#include "dpmove/net.h"
#include "dpmove/status.h"

namespace dpmove {

namespace {

using net::Agent;
using net::Peer;
using net::RemoteHandle;

py::bytes to_bytes(const std::vector<uint8_t>& v) { return py::bytes(reinterpret_cast<const char*>(v.data()), v.size()); }

std::vector<uint8_t> from_buffer(const py::object& o, const char* what) {
  if (py::isinstance<py::str>(o)) throw py::type_error(std::string(what) + " must be bytes, got str");
  py::buffer_info b;
  try {
    b = py::buffer(o).request();
  } catch (const py::error_already_set&) {
    throw py::type_error(std::string(what) + " must be bytes-like, got " + std::string(py::str(py::type::of(o).attr("__name__"))));
  }
  const auto* p = static_cast<const uint8_t*>(b.ptr);
  return std::vector<uint8_t>(p, p + b.size * b.itemsize);
}

py::dict metadata_dict(const net::Metadata& m) {
  py::dict d;
  d["engine_id"] = net::hex(m.engine_id);
  d["host_id"] = net::hex(m.boot_id);
  d["netns"] = m.netns;
  d["pid"] = m.pid;
  d["uid"] = m.uid;
  d["hostname"] = m.hostname;
  d["name"] = m.name;
  py::list tcp;
  for (auto& e : m.tcp) tcp.append(e.str());
  d["tcp"] = tcp;
  d["unix"] = m.unix_name;
  py::list verbs;
  for (auto& v : m.verbs) {
    py::dict x;
    x["device"] = v.device;
    x["port"] = v.port;
    x["lid"] = v.lid;
    x["gid"] = net::hex(v.gid);
    verbs.append(x);
  }
  d["verbs"] = verbs;
  return d;
}

py::dict counters(const std::map<std::string, int64_t>& m) {
  py::dict d;
  for (auto& kv : m) d[py::str(kv.first)] = kv.second;
  return d;
}

RemoteHandle handle_of(const py::object& o) {
  if (py::isinstance<RemoteHandle>(o)) return o.cast<RemoteHandle>();
  auto b = from_buffer(o, "dst");
  return RemoteHandle::parse(b.data(), b.size());
}

}  // namespace

void bind_net(py::module_& m) {
  py::class_<RemoteHandle>(m, "RemoteRegion", R"doc(
Handle of a region another engine exposed for writes: engine id, key and size. Send
``to_bytes()`` to the writer however you like; ``RemoteRegion.from_bytes()`` reads it back.
A peer can write only inside [0, size) of a region its owner exposed.
)doc")
      .def_property_readonly("key", [](const RemoteHandle& h) { return h.key; })
      .def_property_readonly("size", [](const RemoteHandle& h) { return h.size; })
      .def_property_readonly("writable", [](const RemoteHandle& h) { return (h.flags & net::kHandleWritable) != 0; })
      .def_property_readonly("shareable", [](const RemoteHandle& h) { return (h.flags & net::kHandleShm) != 0; },
                             "True when the region can be mapped by a shm peer (allocated by Engine.alloc)")
      .def_property_readonly("engine_id", [](const RemoteHandle& h) { return net::hex(h.engine); })
      .def("to_bytes", [](const RemoteHandle& h) { return to_bytes(h.encode()); })
      .def_static("from_bytes", [](py::object b) {
        auto v = from_buffer(b, "handle");
        return RemoteHandle::parse(v.data(), v.size());
      })
      .def("__eq__", [](const RemoteHandle& a, const RemoteHandle& b) {
        return a.engine == b.engine && a.key == b.key && a.size == b.size && a.flags == b.flags;
      })
      .def("__hash__", [](const RemoteHandle& h) { return py::hash(py::make_tuple(net::hex(h.engine), h.key, h.size)); })
      .def("__repr__", [](const RemoteHandle& h) {
        return "<dpmove.RemoteRegion key=" + std::to_string(h.key) + " size=" + std::to_string(h.size) + " engine=" +
               net::hex(h.engine).substr(0, 8) + ((h.flags & net::kHandleWritable) ? "" : " read-only") + ">";
      });

  py::class_<net::Notification>(m, "Notification", "A notification delivered after every entry of its request landed")
      .def_property_readonly("data", [](const net::Notification& n) { return to_bytes(n.data); })
      .def_property_readonly("peer", [](const net::Notification& n) { return n.peer; }, "the sender's engine name")
      .def_property_readonly("sender", [](const net::Notification& n) { return net::hex(n.sender); }, "the sender's engine id")
      .def_property_readonly("request", [](const net::Notification& n) { return n.request; },
                             "the sender's per-peer request sequence number")
      .def("__repr__", [](const net::Notification& n) {
        return "<dpmove.Notification from '" + n.peer + "' " + std::to_string(n.data.size()) + " bytes>";
      });

  py::class_<Peer, std::shared_ptr<Peer>>(m, "Peer", R"doc(
A connection to another engine for one-sided writes into the regions it exposed.
Created by Engine.connect(). The transport (shm, tcp or verbs) is fixed at connect time.
)doc")
      .def_property_readonly("transport", [](const Peer& p) { return std::string(p.transport_name()); })
      .def_property_readonly("name", &Peer::name)
      .def_property_readonly("remote", [](const Peer& p) { return metadata_dict(p.remote()); })
      .def_property_readonly("broken", [](const Peer& p) -> py::object {
        std::string b = p.broken();
        if (b.empty()) return py::none();
        return py::str(b);
      }, "None while healthy, else why the connection is unusable")
      .def_property_readonly("closed", &Peer::closed)
      .def("stats", [](const Peer& p) { return counters(p.stats()); })
      .def("reconnect", [](Peer& p) {
        py::gil_scoped_release nogil;  // dials and handshakes
        p.connect();
      }, "Drop the current connection (its unfinished requests fail) and connect again with the same metadata")
      .def("close", [](Peer& p) {
        py::gil_scoped_release nogil;  // joins the transport's threads
        p.close();
      })
      .def("write",
           [](Peer& p, py::handle src, py::object dst, py::array entries, py::object notify, py::object timeout_s, bool timing,
              int qos_class, int64_t default_timeout) {
             if (!py::isinstance<Region>(src))
               throw py::type_error("src must be a Region from Engine.alloc() or Engine.register()");
             auto region = src.cast<std::shared_ptr<Region>>();
             RemoteHandle h = handle_of(dst);
             if (!py::isinstance<py::array_t<int64_t>>(entries) || entries.ndim() != 2 || entries.shape(1) != 3 ||
                 !(entries.flags() & py::array::c_style))
               throw py::type_error("entries must be a C-contiguous int64 array of shape (N, 3): remote_offset, local_offset, length");
             std::vector<uint8_t> note;
             bool has_note = !notify.is_none();
             if (has_note) note = from_buffer(notify, "notify");
             int64_t t = seconds_to_ns(timeout_s, default_timeout, "timeout_s");
             const auto* rows = static_cast<const IoEntry*>(entries.data());
             size_t n = static_cast<size_t>(entries.shape(0));
             if (n < 1024 && p.prepared(h))
               return p.put(region, h, rows, n, note.data(), note.size(), has_note, t, timing, qos_class);
             py::gil_scoped_release nogil;
             return p.put(region, h, rows, n, note.data(), note.size(), has_note, t, timing, qos_class);
           },
           py::arg("src"), py::arg("dst"), py::arg("entries"), py::arg("notify") = py::none(), py::arg("timeout_s") = py::none(),
           py::arg("timing") = false, py::arg("qos_class") = -1, py::arg("default_timeout_ns") = INT64_MAX)
      .def("__repr__", [](const Peer& p) {
        std::string b = p.broken();
        return "<dpmove.Peer " + std::string(p.transport_name()) + " " + p.name() + (b.empty() ? "" : " broken: " + b) + ">";
      });

  m.def("parse_metadata", [](py::object b) {
    auto v = from_buffer(b, "metadata");
    return metadata_dict(net::Metadata::parse(v.data(), v.size()));
  }, py::arg("metadata"), "Decode Engine.metadata() bytes into a dict; ValueError says what is wrong with bad input");

  m.def("verbs_usable", [] {
    std::string why;
    bool ok = net::verbs_usable(&why);
    return py::make_tuple(ok, why);
  });

  auto eng = py::reinterpret_borrow<py::class_<Engine, std::shared_ptr<Engine>>>(m.attr("Engine"));
  eng.def("metadata", [](Engine& e) {
       std::shared_ptr<Agent> a;
       {
         py::gil_scoped_release nogil;
         a = e.agent();
       }
       return to_bytes(a->metadata().encode());
     })
      .def("expose", [](Engine& e, const std::shared_ptr<Region>& r, bool writable) {
        std::shared_ptr<Agent> a;
        {
          py::gil_scoped_release nogil;
          a = e.agent();
        }
        return a->expose(r, writable);
      }, py::arg("region"), py::arg("writable") = true)
      .def("unexpose", [](Engine& e, py::object h) {
        uint32_t key = py::isinstance<RemoteHandle>(h) ? h.cast<RemoteHandle>().key : h.cast<uint32_t>();
        std::shared_ptr<Agent> a;
        py::gil_scoped_release nogil;  // may drop the last reference to a Python buffer
        a = e.agent();
        return a->unexpose(key);
      })
      .def("exposed", [](Engine& e) { return e.agent()->exposures(); })
      .def("connect",
           [](Engine& e, py::object md, const std::string& transport, int streams, py::object timeout_s, int chain,
              int signal_every) {
             auto v = from_buffer(md, "metadata");
             net::Metadata meta = net::Metadata::parse(v.data(), v.size());
             net::ConnectOptions o;
             o.transport = transport;
             o.streams = streams;
             o.timeout_ns = seconds_to_ns(timeout_s, int64_t{10} * 1000000000, "timeout_s");
             o.chain = chain;
             o.signal_every = signal_every;
             std::shared_ptr<Peer> p;
             {
               py::gil_scoped_release nogil;  // dials and handshakes
               p = e.agent()->connect(meta, o);
             }
             return release_gil_on_drop(std::move(p));
           },
           py::arg("metadata"), py::arg("transport") = "auto", py::arg("streams") = 1, py::arg("timeout_s") = 10.0,
           py::arg("chain") = 32, py::arg("signal_every") = 16)
      .def("next_notification", [](Engine& e, py::object timeout_s) -> py::object {
        int64_t t = seconds_to_ns(timeout_s, INT64_MAX, "timeout_s");
        net::Notification n;
        bool got;
        {
          py::gil_scoped_release nogil;  // blocks until a notification or the timeout
          got = e.agent()->next_notification(&n, t);
        }
        if (!got) return py::none();
        return py::cast(std::move(n));
      }, py::arg("timeout_s") = py::none())
      .def("net_stats", [](Engine& e) { return counters(e.agent()->stats()); });
}

}  // namespace dpmove
