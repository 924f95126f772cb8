"""The public Engine: argument normalisation over the native core.

Batches are integer arrays of shape (N, 3) - file_offset, region_offset, length, all in bytes -
never lists of per-entry objects. Any integer dtype is accepted; it is converted once to a
C-contiguous int64 array (no copy when it already is one).
"""

from __future__ import annotations

import atexit
import copy
import os
import warnings
import weakref
from typing import Any, Optional, Union

import numpy as np

from . import _core
from .qos import QosConfig

__all__ = ["Engine", "entries", "as_entries"]

_INT64_MAX = np.iinfo(np.int64).max
_live: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def as_entries(batch: Any) -> np.ndarray:
    """Returns `batch` as a C-contiguous int64 array of shape (N, 3).

    Accepts any integer array-like of shape (N, 3), or (3,) for a single entry. An empty
    batch ([] or shape (0, 3)) gives shape (0, 3). Raises TypeError for non-integer data,
    ValueError for a wrong shape or integers that do not fit in int64.
    """
    a = np.asarray(batch)
    if a.dtype == np.int64 and a.ndim == 2 and a.shape[1] == 3 and a.flags.c_contiguous:
        return a
    if a.size == 0 and (a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 3)):
        return np.empty((0, 3), dtype=np.int64)
    if a.dtype.kind not in "iu":
        _check_python_ints(batch, a)
        raise TypeError(f"entries must be integers (file_offset, region_offset, length in bytes); got dtype {a.dtype}")
    if a.ndim == 1 and a.shape[0] == 3:
        a = a.reshape(1, 3)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"entries must have shape (N, 3): file_offset, region_offset, length; got shape {a.shape}")
    if a.dtype.kind == "u" and int(a.max()) > _INT64_MAX:
        raise ValueError("entries hold values above 2**63-1 bytes; offsets and lengths must fit in int64")
    return np.ascontiguousarray(a, dtype=np.int64)


def _check_python_ints(obj: Any, a: np.ndarray) -> None:
    """Raises ValueError when `obj` (not already an array) holds only integers that numpy turned
    into a float64 or object array because some lie outside int64 (e.g. [2**63, 0, 1])."""
    if isinstance(obj, np.ndarray) or a.dtype.kind not in "fO":
        return
    vals = np.asarray(obj, dtype=object).reshape(-1)
    if vals.size and all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in vals):
        raise ValueError("entries hold integers outside [-2**63, 2**63-1]; offsets and lengths must fit in int64")


def entries(file_offsets: Any, region_offsets: Any, lengths: Any) -> np.ndarray:
    """Builds an (N, 3) int64 batch from three columns; scalars broadcast."""
    raw = (file_offsets, region_offsets, lengths)
    arrs = [np.asarray(c) for c in raw]
    # Fast path (a few microseconds): signed-integer columns of one length N, or scalars.
    if all(a.dtype.kind == "i" and a.ndim <= 1 for a in arrs):
        n = max(a.size for a in arrs)
        if all(a.ndim == 0 or a.size == n for a in arrs):
            out = np.empty((n, 3), dtype=np.int64)
            for j, a in enumerate(arrs):
                out[:, j] = a
            return out
    cols = np.broadcast_arrays(*arrs)
    for obj, c in zip(raw, cols):
        if c.size == 0:  # empty columns ([] is float64 in numpy) make an empty batch
            continue
        if c.dtype.kind not in "iu":
            _check_python_ints(obj, c)
            raise TypeError(f"entries must be integers; got dtype {c.dtype}")
        if c.dtype.kind == "u" and c.size and int(c.max()) > _INT64_MAX:
            raise ValueError("entries hold values above 2**63-1 bytes; offsets and lengths must fit in int64")
    out = np.empty((cols[0].size, 3), dtype=np.int64)
    for j, c in enumerate(cols):
        out[:, j] = c.reshape(-1)
    return out


def _is_device(r: Any) -> bool:
    return isinstance(r, _core.Region) and r.location != "host"


def _parse_cai(cai: Any) -> "tuple[int, int, bool]":
    """(address, nbytes, readonly) of a C-contiguous ``__cuda_array_interface__`` (v0-v3)."""
    if not isinstance(cai, dict):
        raise ValueError(f"__cuda_array_interface__ must be a dict, got {type(cai).__name__}")
    try:
        shape = tuple(int(d) for d in cai["shape"])
        typestr = str(cai["typestr"])
        data = cai["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"__cuda_array_interface__ lacks a valid shape / typestr / data: {e!r}") from None
    if cai.get("mask") is not None:
        raise ValueError("__cuda_array_interface__ with a mask is not supported")
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"__cuda_array_interface__ data must be (pointer, read_only), got {data!r}")
    addr, ro = int(data[0] or 0), bool(data[1])
    try:
        itemsize = np.dtype(typestr).itemsize
    except TypeError:
        raise ValueError(f"__cuda_array_interface__ typestr {typestr!r} is not a dtype") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"__cuda_array_interface__ shape {shape} has a negative dimension")
    strides = cai.get("strides")
    if strides is not None:
        expect = itemsize
        for dim, st in zip(reversed(shape), reversed(tuple(int(x) for x in strides))):
            if dim > 1 and st != expect:
                raise ValueError(
                    f"expected a C-contiguous array; this one is strided (strides {tuple(strides)} bytes for shape {shape}); "
                    "make it contiguous first (e.g. cupy.ascontiguousarray)")
            expect *= dim
    n = itemsize
    for d in shape:
        n *= d
    if n == 0:
        raise ValueError("register_device: the array is empty (0 bytes)")
    if addr == 0:
        raise ValueError("__cuda_array_interface__ data pointer is NULL")
    return addr, n, ro


class Engine:
    """One per process: owns the I/O workers, rings, registered memory and files.

    Parameters
    ----------
    backend:
        ``"auto"`` (io_uring where usable, else the thread pool; the environment variable
        ``DPMOVE_BACKEND`` overrides), ``"io_uring"`` (raise if unusable) or ``"threadpool"``.
    num_workers:
        Rings (io_uring) or thread groups (thread pool). Large batches are split across them.
    queue_depth:
        Entries in flight per worker.
    register_buffers, register_files:
        Register regions and files with the rings (fixed buffers / files). A failed
        registration is not an error: the region works unregistered and says why.
    default_timeout_s:
        Deadline given to requests that do not name one (None: no deadline).
    listen_host, listen_port:
        Where the engine accepts peers' connections for one-sided writes (tcp), once
        ``metadata()``, ``expose()`` or ``connect()`` is first called. Loopback by default;
        ``"0.0.0.0"`` for every interface. Port 0 picks a free one.
    listen_unix:
        Also accept same-host peers (shm) on an abstract unix socket; only the same user may
        connect.
    name:
        Display name in metadata, notifications and error messages.
    qos:
        Traffic classes and their arbitration (``dpmove.QosConfig``). None: the defaults with
        ``DPMOVE_QOS_FILE`` / ``DPMOVE_QOS`` applied (``QosConfig.from_env()``). Every read,
        write and peer write names a class (``traffic_class="kv_load"``), or gets the
        configuration's default class.
    gpu:
        ``"auto"`` (the CUDA driver when it sees a device, else the emulated GPU; the
        environment variable ``DPMOVE_GPU`` overrides), ``"cuda"`` (raise without one),
        ``"emulated"`` (device regions in host memory: the same API and code paths, never GPU
        measurements) or ``"off"``.
    pin_host:
        Pin (page-lock and map for the GPU) every host region at registration, once, so copies
        use it directly (``Region.pinned``, ``Region.pin_error``).
    """

    def __init__(
        self,
        backend: Optional[str] = None,
        *,
        num_workers: int = 2,
        queue_depth: int = 64,
        register_buffers: bool = True,
        register_files: bool = True,
        default_timeout_s: Optional[float] = 60.0,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        listen_unix: bool = True,
        name: str = "",
        qos: Optional[QosConfig] = None,
        gpu: Optional[str] = None,
        pin_host: bool = True,
    ) -> None:
        if backend is None:
            backend = os.environ.get("DPMOVE_BACKEND", "auto")
        if gpu is None:
            gpu = os.environ.get("DPMOVE_GPU", "auto")
        if qos is None:
            qos = QosConfig.from_env()
        elif not isinstance(qos, QosConfig):
            raise TypeError(f"qos must be a dpmove.QosConfig or None, got {type(qos).__name__}")
        # A copy: later changes to the caller's object do not reach a running engine.
        self._qos = copy.deepcopy(qos.validate())
        self._core = _core.Engine(
            backend,
            num_workers=num_workers,
            queue_depth=queue_depth,
            register_buffers=register_buffers,
            register_files=register_files,
            default_timeout_s=default_timeout_s,
            listen_host=listen_host,
            listen_port=listen_port,
            listen_unix=listen_unix,
            name=name,
            qos=self._qos.core_options(),
            gpu=gpu,
            pin_host=pin_host,
        )
        _live.add(self)

    # --- facts -------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``"io_uring"`` or ``"threadpool"``."""
        return self._core.backend

    @property
    def backend_reason(self) -> str:
        """Why this backend is active (e.g. why io_uring was not usable)."""
        return self._core.backend_reason

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def num_workers(self) -> int:
        return self._core.num_workers

    @property
    def queue_depth(self) -> int:
        return self._core.queue_depth

    def stats(self) -> dict:
        """Counters: entries started, kernel ops, resubmits, cancels, fixed buffer/file use;
        ``"qos"``: ``qos_stats()``."""
        d = self._core.stats()
        d["qos"] = self._core.qos_stats()
        return d

    @property
    def qos(self) -> QosConfig:
        """A copy of the QoS configuration this engine runs with."""
        return copy.deepcopy(self._qos)

    def qos_stats(self) -> dict:
        """Per path (``"storage"``, ``"net"``), per traffic class: ``bytes`` and ``ops``
        dispatched, ``queued_ops`` / ``queued_bytes`` waiting for their turn, ``inflight_bytes``
        dispatched and not ended, ``wait_p50_ns`` / ``wait_p99_ns`` / ``wait_max_ns`` spent
        queued, ``throttled_ns`` with work but no tokens, ``starvation_grants``. With QoS off
        nothing waits, so the wait and throttle figures stay 0."""
        return self._core.qos_stats()

    def describe(self) -> dict:
        return self._core.describe()

    # --- memory and files --------------------------------------------------------------------
    def alloc(self, nbytes: int, *, hugepages: bool = False, register: bool = True) -> "_core.Region":
        """Zeroed, page-aligned memory owned by dpmove (hugepages: MAP_HUGETLB, 2 MiB pages)."""
        return self._core.alloc(int(nbytes), hugepages=hugepages, register=register)

    def register(self, obj: Any, *, register: bool = True) -> "_core.Region":
        """A Region over a C-contiguous buffer-protocol object (numpy array, bytearray, ...).

        Read-only objects give read-only regions (sources of writes only). The object stays
        exported (cannot be resized) until the region and every request using it are gone.
        """
        return self._core.register(obj, register=register)

    # --- GPU ---------------------------------------------------------------------------------
    def gpu_info(self) -> dict:
        """``provider`` (``"cuda"``, ``"emulated"`` or ``"off"``), ``emulated``, ``reason``
        and ``devices`` (index, name, compute_capability)."""
        return self._core.gpu_info()

    def device_alloc(self, nbytes: int, *, device: int = 0) -> "_core.Region":
        """Device memory owned by dpmove (cuMemAlloc; emulated: host pages), freed when the
        region and every request using it are gone. Uninitialised."""
        return self._core.device_alloc(int(nbytes), int(device))

    def register_device(self, obj: Any, *, device: Optional[int] = None, readonly: Optional[bool] = None) -> "_core.Region":
        """A device Region over a GPU array: anything with ``__cuda_array_interface__``
        (CuPy, Numba) or ``__dlpack__`` (torch, JAX, CuPy), C-contiguous, on a CUDA device.

        The array stays referenced until the region and every request using it are gone.
        ``device`` checks the array is on that device (None: wherever it is). ``readonly``
        overrides the array's own flag (True makes the region a copy source only). Host arrays
        (numpy, ``kDLCPU`` tensors), strided views, freed or managed memory raise ValueError /
        UsageError saying which.
        """
        dev = -1 if device is None else int(device)
        cai = getattr(obj, "__cuda_array_interface__", None)
        if cai is not None:
            addr, nbytes, ro = _parse_cai(cai)
            if readonly is not None:
                if ro and not readonly:
                    raise ValueError("the array is read-only (__cuda_array_interface__ data[1] is True)")
                ro = bool(readonly)
            return self._core._wrap_device(addr, nbytes, dev, not ro, obj, "cuda_array_interface")
        if hasattr(obj, "__dlpack__"):
            dl_dev = obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__") else None
            if dl_dev is not None and int(dl_dev[0]) != 2:
                kind = {1: "kDLCPU (host memory)", 3: "kDLCUDAHost (pinned host memory)", 13: "kDLCUDAManaged"}.get(
                    int(dl_dev[0]), f"device type {int(dl_dev[0])}")
                raise ValueError(f"expected device memory (DLPack kDLCUDA), got {kind}"
                                 + ("; register host memory with Engine.register" if int(dl_dev[0]) in (1, 3) else ""))
            try:
                cap = obj.__dlpack__(max_version=(1, 0))
            except TypeError:  # producers older than DLPack 1.0 take no max_version
                cap = obj.__dlpack__()
            return self._core._register_dlpack(cap, dev, readonly)
        raise TypeError(
            f"expected a GPU array with __cuda_array_interface__ or __dlpack__ (CuPy, torch, ...), got {type(obj).__name__}"
        )

    def copy(
        self,
        dst: "_core.Region",
        src: "_core.Region",
        batch: Any = None,
        *,
        backend: str = "auto",
        timeout_s: Optional[float] = None,
        timing: bool = False,
        traffic_class: Optional[str] = None,
    ) -> "_core.Request":
        """Copies between host and device memory: one side a device Region, the other a host
        Region (or a writable C-contiguous buffer, registered here).

        `batch`: (N, 3) rows of (dst_offset, src_offset, length) in bytes; None copies all of
        `src` to the start of `dst` (ValueError when their sizes differ). `backend`:
        ``"cuda"`` (copy engine, one cuMemcpyAsync per row), ``"batched"`` (one kernel launch
        gathers / scatters all rows; host memory must be pinned), ``"cnic"`` (an RDMA write
        through the GPU's NIC on a loopback queue pair; needs verbs) or ``"auto"``. Returns at
        once with a Request whose entries end per row.
        """
        dst_dev = _is_device(dst)
        src_dev = _is_device(src)
        if dst_dev == src_dev:
            raise ValueError("copy: expected one device Region and one host Region, got "
                             + ("two device regions" if dst_dev else "two host regions (use Engine.read/write or numpy)"))
        if not dst_dev:
            dst = self._core.register(dst, register=False)
        else:
            src = self._core.register(src, register=False)
        if batch is None:
            if len(dst) != len(src):
                raise ValueError(f"copy: sizes differ (dst {len(dst)} bytes, src {len(src)} bytes); pass a batch to copy part")
            rows = np.array([[0, 0, len(src)]], dtype=np.int64)
        else:
            rows = as_entries(batch)
        cls = self._qos.class_index(traffic_class)
        if dst_dev:  # h2d: core rows are (device_offset, host_offset, length) = (dst, src, length)
            return self._core.copy("h2d", dst, src, rows, timeout_s, timing, cls, backend)
        # d2h: (device_offset, host_offset) = (src, dst): swap the first two columns
        return self._core.copy("d2h", src, dst, np.ascontiguousarray(rows[:, [1, 0, 2]]), timeout_s, timing, cls, backend)

    def copy_backend_status(self, backend: str, device: int = 0) -> str:
        """'' when `backend` can copy on `device` here, else why not."""
        return self._core.copy_backend_status(backend, device)

    def copy_stats(self) -> dict:
        """Per copy backend: runs, copies, launches, bytes, errors, pageable copies, submit_ns,
        descriptor tables."""
        return self._core.copy_stats()

    def open(
        self, path: Union[str, os.PathLike], mode: str = "r", *, direct: Union[bool, str] = "auto", register: bool = True
    ) -> "_core.File":
        """Opens `path` for block I/O.

        mode: ``"r"`` read; ``"r+"`` read/write, must exist; ``"rw"`` read/write, created if
        missing; ``"w"`` write, created and truncated; ``"w+"`` read/write, created and truncated.
        direct: ``True`` O_DIRECT or raise; ``False`` page cache; ``"auto"`` O_DIRECT where the
        filesystem allows it (``File.direct`` and ``File.direct_reason`` say what happened).
        """
        return self._core.open(os.fsdecode(os.fspath(path)), mode, direct, register)

    # --- transfers ---------------------------------------------------------------------------
    def read(
        self,
        file: "_core.File",
        region: Any,
        batch: Any,
        *,
        timeout_s: Optional[float] = None,
        timing: bool = False,
        traffic_class: Optional[str] = None,
    ) -> "_core.Request":
        """Reads file bytes into `region` for every (file_offset, region_offset, length) row.

        `region` is a Region or a writable C-contiguous buffer (used unregistered). Returns at
        once with a Request; `timeout_s` sets its deadline (None: the engine default).
        `timing` records per-entry latency (Request.latency_ns). `traffic_class` names the QoS
        class (None: the configuration's default class); unknown names raise ValueError.
        """
        return self._core.read(file, region, as_entries(batch), timeout_s, timing, self._qos.class_index(traffic_class))

    def write(
        self,
        file: "_core.File",
        region: Any,
        batch: Any,
        *,
        timeout_s: Optional[float] = None,
        timing: bool = False,
        traffic_class: Optional[str] = None,
    ) -> "_core.Request":
        """Writes region bytes to the file for every (file_offset, region_offset, length) row;
        arguments as for read()."""
        return self._core.write(file, region, as_entries(batch), timeout_s, timing, self._qos.class_index(traffic_class))

    # --- one-sided writes between engines ------------------------------------------------
    def metadata(self) -> bytes:
        """Versioned bytes describing how to reach this engine; give them to writers, which
        pass them to their ``connect()``. Starts the listener on first use."""
        return self._core.metadata()

    def expose(self, region: "_core.Region", *, writable: bool = True) -> "_core.RemoteRegion":
        """Lets peers write into `region`; returns the handle they name it by.

        Only [0, region size) is reachable, and the receiver re-checks every write against it.
        shm peers map the region's memory: that needs a region from ``alloc()`` (a registered
        Python buffer can be written over tcp and verbs only).
        """
        return self._core.expose(region, writable)

    def unexpose(self, handle: Union["_core.RemoteRegion", int]) -> bool:
        """Stops accepting writes into the region (later writes fail per entry)."""
        return self._core.unexpose(handle)

    def exposed(self) -> list:
        return self._core.exposed()

    def connect(
        self,
        metadata: bytes,
        *,
        transport: str = "auto",
        streams: int = 1,
        timeout_s: Optional[float] = 10.0,
        chain: int = 32,
        signal_every: int = 16,
    ) -> "Peer":
        """Connects to the engine that produced `metadata`.

        transport: ``"auto"`` (shm for a peer on this host, in this network namespace and of
        this user; verbs where an RDMA device is usable on both sides; else tcp), or one of
        ``"shm"``, ``"tcp"``, ``"verbs"``. streams (1-16): tcp connections, or shm copy
        threads; a request of 1 MiB or more is split across them by bytes. chain / signal_every:
        verbs work requests per doorbell and per signalled completion. The metadata is
        untrusted input: malformed bytes raise ValueError.
        """
        from .net import Peer

        core = self._core.connect(metadata, transport, streams, timeout_s, chain, signal_every)
        return Peer(core, self._core.default_timeout_ns, self._qos)

    def next_notification(self, timeout_s: Optional[float] = None) -> Optional["_core.Notification"]:
        """The oldest notification not yet taken, waiting up to `timeout_s` (None: forever; 0:
        poll). None on timeout or when the engine closes."""
        return self._core.next_notification(timeout_s)

    def net_stats(self) -> dict:
        """Receiver counters: connections, bytes_received, writes_refused, requests_completed,
        notifications_delivered, protocol_errors."""
        return self._core.net_stats()

    # --- lifetime ----------------------------------------------------------------------------
    def close(self, timeout_s: Optional[float] = 10.0) -> None:
        """Cancels what is in flight, waits up to `timeout_s` for the kernel to release the
        buffers, and stops the workers. Idempotent. Warns (ResourceWarning) when I/O was still
        running at the end: its memory is then kept, never freed under the kernel."""
        stuck = self._core.close(timeout_s)
        if stuck:
            warnings.warn(
                f"dpmove.Engine.close: {stuck} entries still running after {timeout_s} s; their buffers are kept alive",
                ResourceWarning,
                stacklevel=2,
            )

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.num_workers} workers x depth {self.queue_depth}"
        return f"<dpmove.Engine {self.backend} {state}>"


@atexit.register
def _close_all() -> None:
    # Workers must be gone before the interpreter tears down: they may still need the GIL to
    # give a Python buffer back.
    for e in list(_live):
        try:
            e.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
