"""dpmove: data movement for KV cache in agentic LLM inference.

Register memory once, open files for block I/O, then move KV blocks in batches described by
integer arrays. Every request has a deadline, a terminal state and per-entry status.

>>> import dpmove, numpy as np
>>> with dpmove.Engine() as eng:
...     buf = eng.alloc(1 << 20)
...     f = eng.open("/tmp/kv.bin", "w+")
...     eng.write(f, buf, [(0, 0, 1 << 20)]).result()
"""

from __future__ import annotations

from . import _core
from ._core import (
    ENTRY_OK,
    ENTRY_PENDING,
    ENTRY_RUNNING,
    ENTRY_SHORT,
    File,
    Region,
    Request,
    RequestState,
)
from .engine import Engine, as_entries, entries
from .errors import (
    Cancelled,
    Error,
    NotFound,
    PermissionDenied,
    TimedOut,
    TransferError,
    UnsupportedOperation,
)
from .info import info
from .net import Notification, Peer, RemoteRegion, parse_metadata
from .qos import PathLimits, QosConfig, TrafficClass

__version__ = _core.__version__

for _cls in (File, Region, Request, RequestState, RemoteRegion, Notification):
    _cls.__module__ = "dpmove"
del _cls

__all__ = [
    "Engine",
    "Region",
    "File",
    "Request",
    "RequestState",
    "entries",
    "as_entries",
    "Peer",
    "RemoteRegion",
    "Notification",
    "parse_metadata",
    "QosConfig",
    "TrafficClass",
    "PathLimits",
    "info",
    "Error",
    "TransferError",
    "TimedOut",
    "Cancelled",
    "UnsupportedOperation",
    "NotFound",
    "PermissionDenied",
    "ENTRY_OK",
    "ENTRY_PENDING",
    "ENTRY_RUNNING",
    "ENTRY_SHORT",
    "__version__",
]
