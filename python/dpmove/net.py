"""One-sided writes into regions that other engines exposed.

The receiver exposes a region and hands out two things: its engine's metadata
(``Engine.metadata()``, bytes) and the region's handle (``RemoteRegion.to_bytes()``). The
writer connects with the metadata and writes batches into the handle:

>>> peer = writer.connect(receiver_metadata)             # shm on one host, else verbs or tcp
>>> req = peer.write(src, handle, dpmove.entries(remote_offsets, local_offsets, lengths),
...                  notify=b"layer 3 done")
>>> req.result()                                          # every byte is in the receiver's memory
>>> receiver.next_notification(timeout_s=1).data          # delivered only after all entries landed
b'layer 3 done'

Batches have the same layout as file requests: column 0 is the offset in the target (the remote
region), column 1 the offset in the local region, column 2 the length, all in bytes.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from . import _core
from .engine import as_entries
from .qos import QosConfig

__all__ = ["Peer", "RemoteRegion", "Notification", "parse_metadata"]

RemoteRegion = _core.RemoteRegion
Notification = _core.Notification


def parse_metadata(metadata: bytes) -> dict:
    """Decodes ``Engine.metadata()`` bytes; raises ValueError saying what is wrong otherwise."""
    return _core.parse_metadata(metadata)


class Peer:
    """A connection to another engine; see ``Engine.connect``.

    ``write()`` returns a ``Request`` like file I/O does: deadline, terminal state, per-entry
    status. A peer that dies fails its unfinished requests with an error naming it and stays
    ``broken`` until ``reconnect()`` (same metadata) or a new ``Engine.connect()`` (a restarted
    peer has new metadata and new handles).
    """

    def __init__(self, core: "_core.Peer", default_timeout_ns: int, qos: "QosConfig") -> None:
        self._core = core
        self._default_timeout_ns = default_timeout_ns
        self._qos = qos

    @property
    def transport(self) -> str:
        """``"shm"``, ``"tcp"`` or ``"verbs"``."""
        return self._core.transport

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def remote(self) -> dict:
        """The peer's decoded metadata."""
        return self._core.remote

    @property
    def broken(self) -> Optional[str]:
        """None while the connection is healthy, else why it is not."""
        return self._core.broken

    @property
    def closed(self) -> bool:
        return self._core.closed

    def stats(self) -> dict:
        return self._core.stats()

    def write(
        self,
        src: "_core.Region",
        dst: Union["_core.RemoteRegion", bytes],
        batch: Any,
        *,
        notify: Optional[bytes] = None,
        timeout_s: Optional[float] = None,
        timing: bool = False,
        traffic_class: Optional[str] = None,
    ) -> "_core.Request":
        """Writes ``src[local_offset : +length]`` to ``dst[remote_offset : +length]`` for every
        (remote_offset, local_offset, length) row.

        Every row is checked against both regions first; a row outside either raises
        ValueError and nothing is sent. ``notify`` (at most 64 KiB) is delivered to the
        receiver's ``next_notification()`` only after every entry landed, never for a request
        that failed in part. ``timeout_s`` sets the deadline (None: the engine default).
        ``traffic_class`` names the class (None: the engine's default class): the request waits
        its turn in the engine's net QoS gate, and on verbs rides the queue pair of the class's
        service level / traffic class.
        """
        return self._core.write(
            src,
            dst,
            as_entries(batch),
            notify,
            timeout_s,
            timing,
            self._qos.class_index(traffic_class),
            self._default_timeout_ns,
        )

    def reconnect(self) -> None:
        """Connects again with the same metadata; unfinished requests of the old connection fail."""
        self._core.reconnect()

    def close(self) -> None:
        """Fails unfinished requests (ECONNABORTED) and closes the connection. Idempotent."""
        self._core.close()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._core).replace("dpmove.Peer", "dpmove.Peer", 1)
