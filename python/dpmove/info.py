"""What dpmove was built with and what works on this host (``dpmove info``)."""

from __future__ import annotations

import os
import platform
import resource
from typing import Optional

from . import _core


def _limit(v: int) -> str:
    return "unlimited" if v == resource.RLIM_INFINITY else f"{v} bytes"


def gpu_info() -> dict:
    """The GPU provider ``Engine()`` picks here (``DPMOVE_GPU`` applied), its devices, and for
    each copy backend whether it works on device 0 and why not; whether the batched kernel was
    compiled into this build (else NVRTC compiles it at first use where libnvrtc loads)."""
    cuda = _core.cuda_status()
    out: dict = {"cuda_driver": {"usable": "yes" if cuda["usable"] else "no", "reason": cuda["reason"] or "ok"}}
    missing = _core._batched_fatbin_missing()
    out["batched_kernel"] = (
        f"fatbin built by nvcc ({_core._batched_fatbin_size()} bytes)" if not missing
        else f"not built: {missing}; NVRTC at first use ({_core._nvrtc_status() or 'libnvrtc not loaded yet'})"
    )
    try:
        eng = _core.Engine("threadpool", gpu=os.environ.get("DPMOVE_GPU", "auto"))
        g = eng.gpu_info()
        out["provider"] = g["provider"] + (" (NOT a GPU: copies are host memcpy)" if g["emulated"] else "")
        out["reason"] = g["reason"]
        out["devices"] = {str(d["index"]): f"{d['name']}" + (f", sm {d['compute_capability']}" if d["compute_capability"] else "")
                          for d in g["devices"]}
        if g["devices"]:
            out["copy_backends"] = {b: (eng.copy_backend_status(b, 0) or "usable") for b in ("cuda", "batched", "cnic")}
        eng.close()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        out["provider"] = f"error: {type(exc).__name__}: {exc}"
    return out


def info(path: Optional[str] = None) -> dict:
    """Returns a dict: version, kernel, each backend (compiled, usable, why), the backend an
    ``Engine()`` picks here and why, the transports for one-sided writes (verbs: whether
    an RDMA device is usable and why not), RLIMIT_MEMLOCK (registered buffers count against it
    when not root), the QoS configuration ``Engine()`` takes from the environment, and - when `path` is given - O_DIRECT support and alignment for that path."""
    uring = _core.probe_io_uring()
    out: dict = {
        "version": _core.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "backends": {
            "io_uring": uring,
            "threadpool": {"compiled": "yes", "usable": "yes", "reason": "pread/pwrite on threads; always available"},
        },
    }
    try:
        eng = _core.Engine(os.environ.get("DPMOVE_BACKEND", "auto"))  # the defaults Engine() uses
        out["active"] = {"backend": eng.backend, "reason": eng.backend_reason, **eng.describe()}
        eng.close()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: info must always answer
        out["active"] = {"backend": "none", "reason": f"{type(exc).__name__}: {exc}"}
    ok, why = _core.verbs_usable()
    out["transports"] = {
        "shm": {"usable": "yes", "reason": "memfd regions mapped by same-host, same-user peers; abstract unix socket"},
        "tcp": {"usable": "yes", "reason": "listens on 127.0.0.1 by default (Engine(listen_host=...))"},
        "verbs": {"usable": "yes" if ok else "no", "reason": why},
    }
    out["gpu"] = gpu_info()
    try:
        from .qos import QosConfig

        q = QosConfig.from_env()
        out["qos"] = {
            "enabled": "yes" if q.enabled else "no (one FIFO per path)",
            "default_class": q.default_class,
            "classes": {
                n: f"level {c.level}, weight {c.weight}, rate {'unlimited' if not c.rate else f'{c.rate:.4g} B/s burst {c.burst}'}, "
                f"ib_sl {c.ib_sl}, roce_tclass {c.roce_tclass}"
                for n, c in q.classes.items()
            },
            "paths": {n: f"inflight {p.inflight}, low_inflight {p.low_inflight}, low_chunk {p.low_chunk} (bytes; 0: none)"
                      for n, p in q.paths.items()},
        }
    except (ValueError, OSError) as exc:  # a bad DPMOVE_QOS / DPMOVE_QOS_FILE: say so
        out["qos"] = {"enabled": "error", "reason": str(exc)}
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    out["memlock"] = {"soft": _limit(soft), "hard": _limit(hard), "root": os.geteuid() == 0}
    if path is not None:
        out["direct_io"] = _core.probe_direct(os.fsdecode(path))
    return out
