"""Traffic classes: what a transfer is for, and how the operator maps that to lanes.

A request names its class by intent (``control``, ``kv_load``, ``kv_store``, ``bulk``, or one
the operator adds). The operator's configuration maps each class to a priority level, a weight
within the level, an optional rate limit, and the fabric lane for verbs (InfiniBand service
level, RoCE traffic class). The defaults follow DualPath: latency-critical traffic alone on the
high lane, every KV class on the low lane; strict priority between lanes, with a starvation
bound so the low lane always progresses.

Configuration sources, later ones override earlier ones: the defaults, a TOML file
(``QosConfig.from_toml``), the environment (``QosConfig.from_env``: ``DPMOVE_QOS_FILE`` names a
TOML file; ``DPMOVE_QOS`` holds ``class.field=value`` pairs separated by ``;``)::

    # qos.toml
    starvation_bound_ms = 20
    quantum_bytes = 65536
    [classes.kv_load]
    weight = 4
    rate = "2.5 GB"        # bytes per second; a number or a size string
    burst = "64 MiB"

    [paths.storage]        # in-flight windows of file I/O (see PathLimits)
    low_inflight = "512 KiB"
    [paths.storage.rates.kv_load]
    rate = "1.2 GB"        # this path only: play a node's storage NIC

    DPMOVE_QOS="kv_load.rate=1e9;control.ib_sl=2;paths.storage.rates.kv_load.rate=1.2e9"
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Dict, Mapping, Optional

from . import _core

__all__ = ["TrafficClass", "PathLimits", "QosConfig", "DEFAULT_CLASS"]

DEFAULT_CLASS = "bulk"  # what a request that names no class gets

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")


def _bytes(v: Any, what: str) -> float:
    """A byte count: a number, or a string like "64 MiB" (binary) / "2.5 GB" (decimal)."""
    if isinstance(v, bool):
        raise ValueError(f"{what}: expected a number of bytes, got {v!r}")
    if isinstance(v, (int, float)):
        x = float(v)
    elif isinstance(v, str):
        m = _SIZE.match(v)
        if not m:
            raise ValueError(f"{what}: expected a number of bytes like 65536, '64 MiB' or '2.5 GB', got {v!r}")
        num, unit, binary = m.groups()
        power = " KMGT".index(unit.upper()) if unit else 0
        x = float(num) * ((1024 if binary or not unit else 1000) ** power)
    else:
        raise ValueError(f"{what}: expected a number of bytes, got {type(v).__name__}")
    if x < 0 or x != x or x == float("inf"):
        raise ValueError(f"{what}: must be a finite number >= 0, got {v!r}")
    return x


@dataclasses.dataclass
class TrafficClass:
    """One class. level: higher is served first. weight (>= 1): share of bytes among the classes
    of its level. rate (bytes/s, 0: unlimited) and burst (bytes, 0: one second of rate): token
    bucket. ib_sl (0-15) / roce_tclass (0-255): the lane its verbs queue pair uses."""

    name: str
    level: int = 0
    weight: int = 1
    rate: float = 0.0
    burst: int = 0
    ib_sl: int = 0
    roce_tclass: int = 0

    def validate(self) -> None:
        if not self.name or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.name):
            raise ValueError(f"traffic class name must be an identifier, got {self.name!r}")
        if not isinstance(self.level, int) or isinstance(self.level, bool):
            raise ValueError(f"{self.name}.level must be an integer, got {self.level!r}")
        if not isinstance(self.weight, int) or isinstance(self.weight, bool) or not 1 <= self.weight <= 1_000_000:
            raise ValueError(f"{self.name}.weight must be an integer in [1, 1000000], got {self.weight!r}")
        self.rate = _bytes(self.rate, f"{self.name}.rate")
        self.burst = int(_bytes(self.burst, f"{self.name}.burst"))
        if not isinstance(self.ib_sl, int) or not 0 <= self.ib_sl <= 15:
            raise ValueError(f"{self.name}.ib_sl must be in [0, 15], got {self.ib_sl!r}")
        if not isinstance(self.roce_tclass, int) or not 0 <= self.roce_tclass <= 255:
            raise ValueError(f"{self.name}.roce_tclass must be in [0, 255], got {self.roce_tclass!r}")


def _defaults() -> Dict[str, TrafficClass]:
    # control alone on the high lane (level 1): model traffic, latency-critical. KV classes
    # share the low lane by weight: loads (on the prefill critical path) before stores.
    # roce_tclass 104 = DSCP 26 (AF31) << 2; 0 = best effort.
    return {
        "control": TrafficClass("control", level=1, weight=1, ib_sl=1, roce_tclass=104),
        "kv_load": TrafficClass("kv_load", level=0, weight=4),
        "kv_store": TrafficClass("kv_store", level=0, weight=2),
        "bulk": TrafficClass("bulk", level=0, weight=1),
    }


@dataclasses.dataclass
class PathLimits:
    """In-flight windows of one path (``storage``: file I/O; ``net``: one-sided writes; ``copy``:
    host<->GPU copies of the cuda and batched backends), in bytes.

    inflight: everything dispatched and not yet ended, all classes (0: no window).
    low_inflight: the same for classes below the top level; what the window leaves is kept for
    the top level, as DualPath reserves most of the NIC for model traffic (0: no window).
    low_chunk: storage only - an entry of a below-top class is read or written in kernel
    operations of at most this many bytes, one after another (a multiple of 4096; 0: whole).
    reserve_idle_ms: low_inflight holds while the top level is active - something of it in
    flight, or its last request or completion less than this long ago; after that the lower
    levels may fill the path (work-conserving). 0: low_inflight always holds.
    rates: per-class rate limits on this path only, {class: {"rate": bytes/s, "burst": bytes}},
    overriding the class's own - e.g. cap ``kv_load`` storage reads to play a node's storage
    NIC while its network writes stay unlimited.
    """

    inflight: int = 0
    low_inflight: int = 0
    low_chunk: int = 0
    reserve_idle_ms: float = 100.0
    rates: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)

    def validate(self, path: str) -> None:
        for f in ("inflight", "low_inflight", "low_chunk"):
            setattr(self, f, int(_bytes(getattr(self, f), f"paths.{path}.{f}")))
        if isinstance(self.reserve_idle_ms, bool) or not isinstance(self.reserve_idle_ms, (int, float)) or not (
            0 <= self.reserve_idle_ms < 1e9
        ):
            raise ValueError(f"paths.{path}.reserve_idle_ms must be a number of milliseconds >= 0, got {self.reserve_idle_ms!r}")
        if not isinstance(self.rates, Mapping):
            raise ValueError(f"paths.{path}.rates must be a table of class -> {{rate, burst}}, got {self.rates!r}")
        for cls, spec in self.rates.items():
            if not isinstance(spec, Mapping) or not spec or set(spec) - {"rate", "burst"}:
                raise ValueError(f"paths.{path}.rates.{cls} must set rate and/or burst only, got {spec!r}")
            self.rates[cls] = {
                k: (float if k == "rate" else int)(_bytes(v, f"paths.{path}.rates.{cls}.{k}")) for k, v in spec.items()
            }
        if self.low_chunk % 4096:
            raise ValueError(f"paths.{path}.low_chunk must be a multiple of 4096 bytes, got {self.low_chunk}")


def _default_paths() -> Dict[str, "PathLimits"]:
    # storage: while control is active, at most 512 KiB of KV reads/writes in the device, in
    # 128 KiB operations, so a latency-critical read queues behind little (the knee of the
    # trade-off measured by `dpmove bench qos` on a virtio disk: 256 KiB starves KV, 1 MiB
    # and up lets control's p99 grow; see the README). net: 16 MiB of KV writes in flight
    # keeps a stream busy while the top level still finds the path free.
    return {
        "storage": PathLimits(inflight=0, low_inflight=512 << 10, low_chunk=128 << 10),
        "net": PathLimits(inflight=0, low_inflight=16 << 20, low_chunk=0),
        # copy (host<->GPU through the cuda / batched backends; cnic copies are RDMA writes and
        # take the net path): 8 MiB of low-level copies in flight while the top level is
        # active, about 150 us of PCIe Gen5 x16, so a control copy waits at most that long.
        "copy": PathLimits(inflight=0, low_inflight=8 << 20, low_chunk=0),
    }


@dataclasses.dataclass
class QosConfig:
    """The operator's mapping of traffic classes to lanes.

    starvation_bound_ms: an operation of a lower level that waited this long is served before
    higher levels' work. quantum_bytes: bytes a weight-1 class may send per round robin turn.
    enabled: False turns arbitration off - every path is one FIFO (no windows, rate limits or
    reordering), the baseline to measure QoS against; classes are still counted. paths:
    in-flight windows per path (PathLimits).
    """

    classes: Dict[str, TrafficClass] = dataclasses.field(default_factory=_defaults)
    starvation_bound_ms: float = 20.0
    quantum_bytes: int = 64 * 1024
    default_class: str = DEFAULT_CLASS
    enabled: bool = True
    paths: Dict[str, PathLimits] = dataclasses.field(default_factory=_default_paths)

    def validate(self) -> "QosConfig":
        if not self.classes:
            raise ValueError("qos: at least one traffic class is needed")
        for name, c in self.classes.items():
            if c.name != name:
                raise ValueError(f"qos: class stored under {name!r} is named {c.name!r}")
            c.validate()
        if self.default_class not in self.classes:
            raise ValueError(f"qos: default_class {self.default_class!r} is not a declared class ({sorted(self.classes)})")
        if not self.starvation_bound_ms > 0:
            raise ValueError(f"qos: starvation_bound_ms must be > 0, got {self.starvation_bound_ms!r}")
        self.quantum_bytes = int(_bytes(self.quantum_bytes, "quantum_bytes"))
        if self.quantum_bytes < 1:
            raise ValueError("qos: quantum_bytes must be >= 1")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"qos: enabled must be true or false, got {self.enabled!r}")
        if set(self.paths) != {"storage", "net", "copy"}:
            raise ValueError(f"qos: paths must be exactly 'storage', 'net' and 'copy', got {sorted(self.paths)}")
        for name, p in self.paths.items():
            p.validate(name)
            for cls in p.rates:
                if cls not in self.classes:
                    raise ValueError(f"qos: paths.{name}.rates names {cls!r}, which is not a declared class ({list(self.classes)})")
        lanes = {(c.ib_sl, c.roce_tclass) for c in self.classes.values()}
        if len(lanes) > 4:
            raise ValueError(f"qos: the classes name {len(lanes)} distinct (ib_sl, roce_tclass) lanes; verbs supports at most 4")
        return self

    def class_index(self, name: "str | None") -> int:
        """Index of class `name` in this configuration (None: -1, the default class)."""
        if name is None:
            return -1
        if not isinstance(name, str):
            raise TypeError(f"traffic_class must be a class name such as 'kv_load' (one of {list(self.classes)}), got {name!r}")
        for i, n in enumerate(self.classes):
            if n == name:
                return i
        raise ValueError(f"unknown traffic class {name!r}; this engine's classes are {list(self.classes)}")

    # --- loading -------------------------------------------------------------------------
    def update(self, data: Mapping[str, Any], source: str = "config") -> "QosConfig":
        """Applies a mapping shaped like the TOML file; unknown keys raise ValueError."""
        top = {"classes", "starvation_bound_ms", "quantum_bytes", "default_class", "enabled", "paths"}
        for k in data:
            if k not in top:
                raise ValueError(f"{source}: unknown key {k!r} (expected one of {sorted(top)})")
        if "starvation_bound_ms" in data:
            self.starvation_bound_ms = float(data["starvation_bound_ms"])
        if "quantum_bytes" in data:
            self.quantum_bytes = data["quantum_bytes"]
        if "default_class" in data:
            self.default_class = str(data["default_class"])
        if "enabled" in data:
            v = data["enabled"]
            if isinstance(v, str) and v.lower() in ("0", "1", "true", "false", "on", "off"):
                v = v.lower() in ("1", "true", "on")
            elif isinstance(v, int) and not isinstance(v, bool) and v in (0, 1):
                v = bool(v)
            self.enabled = v
        pfields = {f.name for f in dataclasses.fields(PathLimits)}
        if "paths" in data and not isinstance(data["paths"], Mapping):
            raise ValueError(f"{source}: paths must be a table of storage / net / copy, got {data['paths']!r}")
        for pname, spec in (data.get("paths") or {}).items():
            if pname not in self.paths:
                raise ValueError(f"{source}: unknown path {pname!r} (expected 'storage' or 'net')")
            if not isinstance(spec, Mapping):
                raise ValueError(f"{source}: paths.{pname} must be a table")
            for k, v in spec.items():
                if k not in pfields:
                    raise ValueError(f"{source}: unknown field paths.{pname}.{k} (expected one of {sorted(pfields)})")
                if k == "rates" and isinstance(v, Mapping):  # merged per class, like the classes table
                    for cls, spec in v.items():
                        if not isinstance(spec, Mapping):
                            raise ValueError(f"{source}: paths.{pname}.rates.{cls} must be a table")
                        self.paths[pname].rates.setdefault(cls, {}).update(spec)
                else:
                    setattr(self.paths[pname], k, v)
        fields = {f.name for f in dataclasses.fields(TrafficClass)} - {"name"}
        for name, spec in (data.get("classes") or {}).items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"{source}: classes.{name} must be a table")
            c = self.classes.get(name) or TrafficClass(name)
            for k, v in spec.items():
                if k not in fields:
                    raise ValueError(f"{source}: unknown field classes.{name}.{k} (expected one of {sorted(fields)})")
                setattr(c, k, v)
            self.classes[name] = c
        return self.validate()

    @classmethod
    def from_toml(cls, path: "os.PathLike[str] | str", base: Optional["QosConfig"] = None) -> "QosConfig":
        import tomllib

        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML: {e}") from e
        return (base or cls()).update(data, str(path))

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, base: Optional["QosConfig"] = None) -> "QosConfig":
        env = os.environ if environ is None else environ
        cfg = base or cls()
        if env.get("DPMOVE_QOS_FILE"):
            cfg = cls.from_toml(env["DPMOVE_QOS_FILE"], cfg)
        spec = env.get("DPMOVE_QOS", "").strip()
        if spec:
            classes: Dict[str, Dict[str, Any]] = {}
            paths: Dict[str, Dict[str, Any]] = {}
            top: Dict[str, Any] = {}
            for item in filter(None, (x.strip() for x in spec.split(";"))):
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"DPMOVE_QOS: expected class.field=value, got {item!r}")
                v: Any = value.strip()
                if re.fullmatch(r"-?[0-9]+", v):
                    v = int(v)
                elif re.fullmatch(r"-?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?", v):
                    v = float(v)
                name, dot, field = key.strip().partition(".")
                if name == "paths" and dot:
                    pname, dot2, pfield = field.partition(".")
                    if not dot2:
                        raise ValueError(f"DPMOVE_QOS: expected paths.<storage|net|copy>.<field>=value, got {item!r}")
                    if pfield.startswith("rates."):
                        parts = pfield.split(".")
                        if len(parts) != 3:
                            raise ValueError(f"DPMOVE_QOS: expected paths.<path>.rates.<class>.<rate|burst>=value, got {item!r}")
                        rates = paths.setdefault(pname, {}).setdefault("rates", {})
                        rates.setdefault(parts[1], {})[parts[2]] = v
                    else:
                        paths.setdefault(pname, {})[pfield] = v
                elif dot:
                    classes.setdefault(name, {})[field] = v
                else:
                    top[name] = v
            data: Dict[str, Any] = dict(top)
            if classes:
                data["classes"] = classes
            if paths:
                data["paths"] = paths
            cfg = cfg.update(data, "DPMOVE_QOS")
        return cfg.validate()

    # --- use -----------------------------------------------------------------------------
    def arbiter(self) -> "_core.QosArbiter":
        """A fresh arbiter for this configuration (classes indexed in declaration order)."""
        self.validate()
        return _core.QosArbiter(
            [self._core_class(c) for c in self.classes.values()],
            int(self.starvation_bound_ms * 1e6),
            int(self.quantum_bytes),
        )

    def core_options(self) -> dict:
        """What the native Engine takes (its `qos` argument)."""
        self.validate()
        names = list(self.classes)
        return {
            "classes": [self._core_class(c) for c in self.classes.values()],
            "starvation_bound_ns": int(self.starvation_bound_ms * 1e6),
            "quantum_bytes": int(self.quantum_bytes),
            "enabled": bool(self.enabled),
            "default_class": names.index(self.default_class),
            **{
                name: {
                    "classes": [self._core_class(c, p.rates.get(n)) for n, c in self.classes.items()],
                    "inflight_bytes": p.inflight,
                    "low_inflight_bytes": p.low_inflight,
                    "low_chunk_bytes": p.low_chunk,
                    "reserve_idle_ns": int(p.reserve_idle_ms * 1e6),
                }
                for name, p in self.paths.items()
            },
        }

    @staticmethod
    def _core_class(c: TrafficClass, rate: Optional[Mapping[str, Any]] = None) -> dict:
        rate = rate or {}
        return {
            "name": c.name,
            "level": c.level,
            "weight": c.weight,
            "rate_bps": _bytes(rate.get("rate", c.rate), f"{c.name}.rate"),
            "burst_bytes": int(_bytes(rate.get("burst", c.burst), f"{c.name}.burst")),
            "ib_sl": c.ib_sl,
            "roce_tclass": c.roce_tclass,
        }

    def microbench(self, ops: int = 1_000_000) -> float:
        """ns per enqueue + dequeue with every class busy, measured in C++."""
        self.validate()
        return _core._qos_microbench([self._core_class(c) for c in self.classes.values()], int(ops))

    def gate_microbench(self, ops: int = 200_000) -> float:
        """ns per operation through a whole gate (submit, arbitration, dispatch, release of
        its bytes) with a sink that completes at once, measured in C++."""
        self.validate()
        return _core._qos_gate_microbench([self._core_class(c) for c in self.classes.values()], int(ops))
