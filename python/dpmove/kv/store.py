"""A crash-safe store of Full Blocks on files, found through a prefix trie of chained block hashes.

Layout of a store directory (any POSIX directory: local, or a 3FS / Lustre / CephFS / NFS mount)::

    dpmove-store.json     format version and the model geometry (written once, atomically)
    index.sqlite          the index: the trie, slot map, pins and free list (SQLite)
    segments/seg-NNNNNN   preallocated segment files of `segment_slots` slots each

A slot is ``slot_bytes`` = the Full Block plus a 64-byte trailer, rounded up to 4 KiB, so one
O_DIRECT write stores a block with its trailer and one read fetches both. The trailer holds a
magic, the block's key, its parent's key, the data length, an XXH3-64 of the data seeded with
the key, and an XXH3-64 of the trailer itself.

Keys are chained: ``key_i = BLAKE2b-128(key_{i-1} || token ids of block i as little-endian
int64)``, with ``key_{-1}`` = 16 zero bytes (ROOT). A key names a whole prefix, so a prompt's
longest cached prefix is its longest run of present keys; a 128-bit cryptographic hash makes a
collision (which would serve another prompt's KV) out of reach.

Crash safety (a block is either fully present and verified, or absent):

1. ``put`` reserves slots in one transaction (rows in state WRITING, owned by this process),
   writes data + trailer with the engine, fdatasyncs the segment, then marks the rows READY in a
   second transaction. A writer killed before that commit leaves only a WRITING row, which is
   never served; the next store that opens (or runs out of space) frees it once its owner is
   dead.
2. Every read is verified: the trailer's own checksum, its key against the key asked for, and
   the data's checksum against both the trailer and the index. A torn or stale slot therefore
   never reads back as valid; it is reported (``BlockCorrupt``), dropped from the index with its
   descendants, and its slot freed. The other blocks stay usable.
3. Index updates are SQLite transactions (atomic, durable at the journal's sync level). A
   corrupted index is moved aside at open and rebuilt from the segment trailers; an empty one
   beside segment files (deleted, truncated) is refilled from them in place. An index that
   cannot be opened for another reason (full disk, I/O error, permissions) is left alone.
   Reads do not need the index to be writable: on a full filesystem they run unpinned.

Locking model (several processes, readers and writers): all index changes are SQLite
transactions (``BEGIN IMMEDIATE`` for writers, so they serialise; WAL journal on local
filesystems, where readers never block writers; a rollback journal on network filesystems,
where WAL's shared memory cannot work). Block data is written outside any transaction, into slots
the writer reserved, so no two writers ever share a slot. Readers pin the blocks they read (a
lease row per process) for the length of the read, so eviction - which runs inside a writer's
transaction and skips pinned, WRITING and non-leaf blocks - never recycles a slot under a read.
Pins and reservations are owned by ``host:pid:start-time``; those of dead processes on this host
are reaped at open and before the store reports itself full. Owners on other hosts are never
presumed dead: ``reap(owner)`` releases them. Eviction is LRU over leaves (a block is touched
whenever a lookup or read hits it), so a parent always outlives its children and presence stays
prefix-closed.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sqlite3
import struct
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _core
from ..engine import Engine, entries
from .checksum import checksum as _checksum
from .checksum import provider as _checksum_provider
from .model import ModelSpec

__all__ = [
    "ROOT",
    "BlockStore",
    "BlockRead",
    "Lookup",
    "StoreError",
    "StoreFull",
    "BlockCorrupt",
    "BlockMissing",
    "IndexCorrupt",
    "chain_keys",
    "PUT_STORED",
    "PUT_EXISTS",
    "PUT_NO_PARENT",
]

FORMAT_VERSION = 1
ROOT = bytes(16)
KEY_BYTES = 16
TRAILER_BYTES = 64
_TRAILER_MAGIC = b"DPMVBLK1"
# magic 8 | key 16 | parent 16 | data_len u32 | flags u32 | data xxh3 u64 | trailer xxh3 u64
_TRAILER = struct.Struct("<8s16s16sIIQQ")
_TRAILER_DTYPE = np.dtype([("magic", "u1", 8), ("key", "u1", 16), ("parent", "u1", 16), ("len", "<u4"),
                           ("flags", "<u4"), ("dsum", "<u8"), ("tsum", "<u8")])  # the same layout, for arrays
assert _TRAILER.size == TRAILER_BYTES == _TRAILER_DTYPE.itemsize
_ALIGN = 4096
# Row states: WRITING (slot reserved, data being written), READY (served), DOOMED (dropped while
# being written; the slot stays reserved until its writer or the reaper releases it).
_WRITING, _READY, _DOOMED = 0, 1, 2

# put() outcome per block
PUT_STORED, PUT_EXISTS, PUT_NO_PARENT = 0, 1, 2

_META_FILE = "dpmove-store.json"
_INDEX_FILE = "index.sqlite"
_SEG_DIR = "segments"
# Filesystems (statfs f_type) where SQLite's WAL cannot work (no shared mmap across clients):
# NFS, CIFS/SMB, Lustre, CephFS, FUSE (3FS), GPFS, 9p.
_NETWORK_FS = {0x6969, 0xFF534D42, 0xFE534D42, 0x0BD00BD0, 0x00C36400, 0x65735546, 0x47504653, 0x01021997}


class StoreError(OSError):
    """A block store operation failed; ``__cause__`` keeps the underlying error."""


class StoreFull(StoreError):
    """No slot is free and none can be evicted (all pinned, in flight or inner nodes), or the
    directory's filesystem is out of space."""


class BlockMissing(StoreError, KeyError):
    """A key asked for is not in the store (never stored, evicted, or dropped as corrupt)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return OSError.__str__(self)


class BlockCorrupt(StoreError):
    """Blocks read back did not verify; they were dropped from the index (with their
    descendants). ``keys`` lists them, ``ok`` is the per-block outcome of the read."""

    def __init__(self, message: str, keys: Sequence[bytes] = (), ok: Optional[np.ndarray] = None) -> None:
        super().__init__(message)
        self.keys = list(keys)
        self.ok = ok


class IndexCorrupt(StoreError):
    """The index could not be read and could not be rebuilt."""


class _Reap(Exception):
    """Internal: a put met reservations of dead writers; reap them and retry."""


# --- keys ------------------------------------------------------------------------------------

def chain_keys(tokens: Any, block_tokens: int, parent: bytes = ROOT) -> List[bytes]:
    """Keys of the full blocks of `tokens` (a 1-D integer sequence), chained from `parent`.

    A trailing partial block has no key. Token ids are hashed as int64, so the same ids give
    the same keys whatever integer dtype they come in.
    """
    if not isinstance(block_tokens, (int, np.integer)) or block_tokens <= 0:
        raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
    _check_key(parent, "parent")
    t = np.asarray(tokens)
    if t.size == 0:
        return []
    if t.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence of token ids, got shape {t.shape}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"tokens must be integers, got dtype {t.dtype}")
    n = t.size // block_tokens
    raw = t[: n * block_tokens].astype("<i8", copy=False).reshape(n, block_tokens)
    keys = []
    prev = bytes(parent)
    for i in range(n):
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
        h.update(raw[i].tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


def _check_key(k: Any, what: str = "key") -> bytes:
    if not isinstance(k, (bytes, bytearray, memoryview)) or len(k) != KEY_BYTES:
        raise TypeError(f"{what} must be {KEY_BYTES} bytes (from chain_keys), got {type(k).__name__}"
                        + (f" of {len(k)} bytes" if isinstance(k, (bytes, bytearray, memoryview)) else ""))
    return bytes(k)


def _keys(keys: Iterable[Any], what: str = "keys") -> List[bytes]:
    if isinstance(keys, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be a sequence of {KEY_BYTES}-byte keys, not one bytes object")
    return [_check_key(k, what[:-1] if what.endswith("s") else what) for k in keys]


def _make_trailer(key: bytes, parent: bytes, data_len: int, data_sum: int) -> bytes:
    head = _TRAILER.pack(_TRAILER_MAGIC, key, parent, data_len, 0, data_sum, 0)[:-8]
    return head + struct.pack("<Q", _checksum(head))


def _parse_trailer(raw: Union[bytes, memoryview, np.ndarray]) -> Optional[Tuple[bytes, bytes, int, int]]:
    """(key, parent, data_len, data_checksum) of a valid trailer, else None."""
    b = bytes(raw)
    if len(b) != TRAILER_BYTES or b[:8] != _TRAILER_MAGIC:
        return None
    magic, key, parent, n, _flags, dsum, tsum = _TRAILER.unpack(b)
    if _checksum(b[:-8]) != tsum:
        return None
    return key, parent, n, dsum


# --- process identity (owner of pins and reservations) ---------------------------------------

def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), which with
    the pid names a process uniquely on this host; None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rindex(b")") + 2:].split()[19].decode()


def _owner_alive(owner: str, host: str) -> bool:
    """False only for an owner (``host:pid:start-time:object``) on this host whose process is
    gone or was replaced; owners on other hosts are presumed alive."""
    parts = owner.split(":")
    if len(parts) < 3:
        return False
    if parts[0] != host:
        return True
    try:
        return _start_time(int(parts[1])) == parts[2]
    except ValueError:
        return False


def _statfs_type(path: str) -> Optional[int]:
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is the first long
        if libc.statfs(os.fsencode(path), buf) != 0:
            return None
        return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    except (OSError, AttributeError):
        return None


# --- results ---------------------------------------------------------------------------------

@dataclass
class Lookup:
    """The longest cached prefix of a prompt: ``keys`` of all its full blocks, ``hits`` how many
    lead ones are in the store (``keys[:hits]``), ``pinned`` whether they are pinned for the
    caller (release with ``BlockStore.unpin(lookup.hit_keys)``)."""

    keys: List[bytes]
    hits: int
    pinned: bool = False

    @property
    def hit_keys(self) -> List[bytes]:
        return self.keys[: self.hits]

    @property
    def miss_keys(self) -> List[bytes]:
        return self.keys[self.hits:]


class BlockRead:
    """Reads of Full Blocks into a host region, verified on completion.

    ``wait()`` / ``done`` follow the engine requests; ``result()`` waits, verifies every block
    (trailer, key, checksum), releases the read's pins and raises ``BlockCorrupt`` (with the
    per-block ``ok`` array), ``BlockMissing`` or the engine's error; ``ok`` is then set.
    """

    def __init__(self, store: "BlockStore", keys: List[bytes], view: np.ndarray, offsets: np.ndarray,
                 rows: List[Tuple[int, int, int]], requests: List[Tuple[Any, np.ndarray]], missing: List[int]) -> None:
        self._store = store
        self.keys = keys
        self._view = view
        self._offsets = offsets
        self._rows = rows  # per block: (seg, slot, checksum) ; seg -1 when missing
        self._requests = requests  # (engine Request, block indices it reads, in entry order)
        self._missing = missing
        self._leased = True  # False: read without pins (the index could not be written)
        self._finished = False
        self._error: Optional[BaseException] = None
        self.ok: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def done(self) -> bool:
        return all(r.done for r, _ in self._requests)

    def wait(self, timeout_s: Optional[float] = None) -> bool:
        """True once every read ended (not yet verified: ``result()`` does that)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for r, _ in self._requests:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not r.wait(left):
                return False
        return True

    def cancel(self) -> None:
        for r, _ in self._requests:
            r.cancel()

    def result(self, timeout_s: Optional[float] = None) -> None:
        if not self._finished:
            self._finish(timeout_s)
        if self._error is not None:
            raise self._error

    def _finish(self, timeout_s: Optional[float]) -> None:
        if not self.wait(timeout_s):
            raise TimeoutError(f"BlockRead of {len(self.keys)} blocks not finished after {timeout_s} s")
        for r, _ in self._requests:
            r.wait_quiesced(None)
        try:
            self._verify()
        except BaseException as e:  # e.g. the pins could not be released: a retry must not pass
            self._error = e
            raise
        finally:
            self._finished = True

    def _verify(self) -> None:
        st = self._store
        n = len(self.keys)
        ok = np.zeros(n, dtype=bool)
        io_failed: Dict[int, str] = {}
        for r, idx in self._requests:
            status = r.status
            for j in np.flatnonzero(status):
                io_failed[int(idx[j])] = _entry_error(int(status[j]))
        bad: List[int] = []
        # Verify the blocks whose I/O succeeded as arrays: one native call for the data
        # checksums (each seeded with its key), one for the trailers' own checksums.
        good = [i for i in range(n) if self._rows[i][0] >= 0 and i not in io_failed]
        if good:
            fb = st.spec.full_block_bytes
            g = len(good)
            offs = self._offsets[good]
            keys = [self.keys[i] for i in good]
            sums = _checksum_seeded(self._view, np.stack([offs, np.full(g, fb, dtype=np.int64)], axis=1), keys)
            raw = self._view[(offs + fb)[:, None] + np.arange(TRAILER_BYTES)]  # (g, 64) copy
            t = raw.view(_TRAILER_DTYPE).reshape(g)
            tsums = _checksum(raw, np.stack([np.arange(g, dtype=np.int64) * TRAILER_BYTES,
                                             np.full(g, TRAILER_BYTES - 8, dtype=np.int64)], axis=1))
            want_keys = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(g, KEY_BYTES)
            index_sums = np.array([self._rows[i][2] for i in good], dtype=np.uint64)
            valid = ((t["magic"] == np.frombuffer(_TRAILER_MAGIC, dtype=np.uint8)).all(axis=1) & (t["tsum"] == tsums)
                     & (t["key"] == want_keys).all(axis=1) & (t["len"] == fb) & (t["dsum"] == sums) & (index_sums == sums))
            for j, i in enumerate(good):
                if valid[j]:
                    ok[i] = True
                else:
                    bad.append(i)
        short = [i for i, e in io_failed.items() if e == "short"]
        bad.extend(short)  # a slot past the end of its segment file: the file was truncated
        st._release_read(self.keys, bad, self._rows, self._leased)
        if bad:
            self._error = BlockCorrupt(
                f"{len(bad)} of {n} blocks failed verification in {st.root} (torn, overwritten or truncated "
                f"segment data); dropped from the index with their descendants: "
                + ", ".join(self.keys[i].hex() for i in bad[:4]) + (" ..." if len(bad) > 4 else ""),
                [self.keys[i] for i in bad], ok)
        elif self._missing:
            self._error = BlockMissing(
                f"{len(self._missing)} of {n} keys are not in the store: "
                + ", ".join(self.keys[i].hex() for i in self._missing[:4]))
        else:
            other = {i: e for i, e in io_failed.items() if e != "short"}
            if other:
                first = next(iter(other.items()))
                err = StoreError(f"{len(other)} of {n} block reads failed; block {first[0]}: {first[1]}")
                err.ok = ok  # type: ignore[attr-defined]
                self._error = err
                # keep the engine's own exception as the cause
                for r, _ in self._requests:
                    try:
                        r.check()
                    except Exception as e:  # noqa: BLE001 - reattached as the cause
                        err.__cause__ = e
                        break
        self.ok = ok


def _entry_error(code: int) -> str:
    if code == _core.ENTRY_SHORT:
        return "short"
    if code < 0:
        return os.strerror(-code)
    return f"status {code}"


def _checksum_seeded(view: np.ndarray, rows: np.ndarray, keys: Sequence[bytes]) -> np.ndarray:
    """Data checksums, each seeded with its block's key (binds the data to the key): one call."""
    seeds = np.frombuffer(b"".join(k[:8] for k in keys), dtype="<u8")  # key[:8] as little-endian u64
    return _checksum(view, rows, seeds)


# --- the store -------------------------------------------------------------------------------

class BlockStore:
    """Full Blocks of one model on files under `root`, with a prefix-trie index.

    Parameters
    ----------
    root:
        The store directory; created (with its parents) if missing.
    spec:
        The model geometry. A new store records it; an existing one must match (ValueError).
    capacity_bytes:
        Most bytes of slots the store may hold (a multiple of ``slot_bytes`` is used; at least
        one slot). None: an existing store's limit, else 64 GiB. Reopening with another value
        changes the limit (shrinking evicts on the next put).
    engine:
        The Engine that reads and writes segment data (the caller's, kept open). None: the store
        makes and owns one.
    segment_slots:
        Slots per segment file (default: as many as fit in 1 GiB, at least 1).
    direct:
        O_DIRECT for segment I/O: ``"auto"`` where the filesystem allows it, True, False.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        spec: ModelSpec,
        *,
        capacity_bytes: Optional[int] = None,
        engine: Optional[Engine] = None,
        segment_slots: Optional[int] = None,
        direct: Union[bool, str] = "auto",
        traffic_class: Optional[str] = None,
    ) -> None:
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a dpmove.kv.ModelSpec, got {type(spec).__name__}")
        if capacity_bytes is not None and (not isinstance(capacity_bytes, (int, np.integer)) or capacity_bytes <= 0):
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if segment_slots is not None and (not isinstance(segment_slots, (int, np.integer)) or segment_slots <= 0):
            raise ValueError(f"segment_slots must be a positive int, got {segment_slots!r}")
        if not _checksum_provider():
            raise StoreError("the block store needs XXH3 checksums: this dpmove was built without xxhash.h and the "
                             "xxhash package is not installed (apt-get install libxxhash-dev and reinstall dpmove, "
                             "or pip install xxhash)")
        self.root = os.path.abspath(os.fspath(root))
        self.spec = spec
        self.slot_bytes = -(-(spec.full_block_bytes + TRAILER_BYTES) // _ALIGN) * _ALIGN
        self._direct = direct
        self._traffic_class = traffic_class
        self._lock = threading.RLock()
        self._files: Dict[int, Any] = {}
        self._closed = False
        self._db: Optional[sqlite3.Connection] = None
        self._own_engine = engine is None
        self._engine = engine
        self.host = socket.gethostname()
        # host:pid:start-time names the process (liveness); the last part this store object, so
        # two stores of one process never drop each other's pins.
        self.owner = f"{self.host}:{os.getpid()}:{_start_time(os.getpid())}:{secrets.token_hex(4)}"
        self.recovered: Optional[str] = None  # why the index was rebuilt at open, if it was
        self._stranded: List[Tuple[bytes, bytes, int, int]] = []  # see _release_stranded
        self.counters = {"puts": 0, "put_bytes": 0, "reads": 0, "read_bytes": 0, "evictions": 0, "corrupt": 0, "reaped": 0}
        try:
            os.makedirs(os.path.join(self.root, _SEG_DIR), exist_ok=True)
        except OSError as e:
            raise StoreError(e.errno, f"cannot create the store directory {self.root}: {e.strerror}") from e
        if not os.access(self.root, os.W_OK | os.X_OK) or not os.access(os.path.join(self.root, _SEG_DIR), os.W_OK | os.X_OK):
            raise StoreError(13, f"the store directory {self.root} is not writable (a store needs to write its index, "
                                 "pins and segments even to read)")
        try:
            self._init_meta(segment_slots)
            self._open_index(capacity_bytes)
            if self._engine is None:
                self._engine = Engine(num_workers=2, queue_depth=64)
            self.reap()
        except BaseException:
            self.close()
            raise

    # --- set-up ------------------------------------------------------------------------------
    def _init_meta(self, segment_slots: Optional[int]) -> None:
        path = os.path.join(self.root, _META_FILE)
        want = {"model": self.spec.name, "num_layers": self.spec.num_layers,
                "bytes_per_token_per_layer": self.spec.bytes_per_token_per_layer,
                "block_tokens": self.spec.block_tokens}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    meta = json.load(f)
                fmt = int(meta["format"])
                got = {k: meta[k] for k in want}
                seg_slots = int(meta["segment_slots"])
                slot_bytes = int(meta["slot_bytes"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise StoreError(f"{path} is not a dpmove store description ({e!r}); "
                                 "move it away to start a new store there") from e
            if fmt != FORMAT_VERSION:
                raise StoreError(f"{self.root} holds a store of format {fmt}; this dpmove reads format {FORMAT_VERSION}")
            if got != want:
                raise ValueError(f"{self.root} holds blocks of {got}, not of {want}; open it with the same model geometry")
            if slot_bytes != self.slot_bytes:
                raise StoreError(f"{path}: slot_bytes {slot_bytes} differs from {self.slot_bytes} for this geometry")
            self.segment_slots = seg_slots
            return
        self.segment_slots = int(segment_slots or max(1, (1 << 30) // self.slot_bytes))
        meta = dict(format=FORMAT_VERSION, slot_bytes=self.slot_bytes, segment_slots=self.segment_slots,
                    trailer_bytes=TRAILER_BYTES, key="blake2b-128 chained, token ids as int64 LE",
                    checksum="xxh3-64 seeded with key[:8] LE", **want)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and exclusive: a concurrent creator's file wins intact
        except FileExistsError:
            os.unlink(tmp)
            return self._init_meta(segment_slots)
        os.unlink(tmp)
        _fsync_dir(self.root)

    def _connect(self, path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=60.0, isolation_level=None, check_same_thread=False)
        try:
            fs = _statfs_type(self.root)
            if fs in _NETWORK_FS:
                db.execute("PRAGMA journal_mode=DELETE")
                db.execute("PRAGMA synchronous=FULL")
            else:
                db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: commits are atomic and ordered; the last ones may be lost on
                # power failure (blocks then absent, never wrong: reads are verified anyway).
                db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            db.close()  # else its descriptors stay open until the object is collected
            raise
        return db

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS blocks(
        key BLOB PRIMARY KEY, parent BLOB NOT NULL, seg INTEGER NOT NULL, slot INTEGER NOT NULL,
        checksum INTEGER NOT NULL, state INTEGER NOT NULL, owner TEXT, children INTEGER NOT NULL DEFAULT 0,
        last_access REAL NOT NULL);
    CREATE INDEX IF NOT EXISTS blocks_lru ON blocks(children, state, last_access);
    CREATE INDEX IF NOT EXISTS blocks_parent ON blocks(parent);
    CREATE UNIQUE INDEX IF NOT EXISTS blocks_slot ON blocks(seg, slot);
    CREATE TABLE IF NOT EXISTS free_slots(seg INTEGER NOT NULL, slot INTEGER NOT NULL, PRIMARY KEY(seg, slot));
    CREATE TABLE IF NOT EXISTS segments(id INTEGER PRIMARY KEY, slots INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS pins(key BLOB NOT NULL, owner TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY(key, owner));
    CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v);
    """

    def _open_index(self, capacity_bytes: Optional[int]) -> None:
        path = os.path.join(self.root, _INDEX_FILE)
        db = None
        try:
            db = self._connect(path)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            db.executescript(self._SCHEMA)
            self._db = db
        except sqlite3.DatabaseError as e:
            if db is not None:
                db.close()
            if not _is_corruption(e):
                # A full disk, an I/O error, a read-only or locked file: the index may well be
                # intact, so it must not be moved aside.
                raise _sql_error(e, self.root) from e
            self._rebuild_index(path, e)
        else:
            # An empty index beside segment files was lost (deleted, or truncated to nothing):
            # refill it from the trailers, in place (other processes may have it open).
            with self._txn() as db:
                lost = db.execute("SELECT COUNT(*) FROM segments").fetchone()[0] == 0 and any(
                    os.path.getsize(p) > 0 for p in self._segment_paths().values())
                if lost:
                    nsegs, nblocks = self._fill_from_segments(db)
            if lost and nblocks:  # (no block: only the space of a first put that failed, now free)
                self.recovered = (f"index {path} was empty beside {nsegs} segment files (deleted or truncated); "
                                  f"rebuilt from the segments: {nblocks} blocks")
                warnings.warn(f"dpmove BlockStore: {self.recovered}", RuntimeWarning, stacklevel=4)
        with self._txn() as db:
            row = db.execute("SELECT v FROM meta WHERE k='capacity_slots'").fetchone()
            if capacity_bytes is not None:
                slots = max(1, int(capacity_bytes) // self.slot_bytes)
                db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES('capacity_slots', ?)", (slots,))
            elif row is None:
                db.execute("INSERT INTO meta(k, v) VALUES('capacity_slots', ?)", (max(1, (64 << 30) // self.slot_bytes),))

    def _rebuild_index(self, path: str, cause: BaseException) -> None:
        """Moves the unreadable index aside and rebuilds it from the segment trailers."""
        aside = f"{path}.corrupt.{int(time.time())}.{os.getpid()}"
        n = 0
        while any(os.path.exists(f"{aside}{suffix}") for suffix in ("", "-wal", "-shm")):
            n += 1  # never overwrite an index moved aside earlier
            aside = f"{path}.corrupt.{int(time.time())}.{os.getpid()}.{n}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, aside + suffix)
        try:
            db = self._connect(path)
            db.executescript(self._SCHEMA)
        except sqlite3.DatabaseError as e:
            raise IndexCorrupt(f"cannot create a new index at {path}: {e}") from cause
        self._db = db
        with self._txn() as db:
            nsegs, nblocks = self._fill_from_segments(db)
        self.recovered = (f"index {path} was unreadable ({cause}); moved to {aside} and rebuilt from "
                          f"{nsegs} segments: {nblocks} blocks")
        warnings.warn(f"dpmove BlockStore: {self.recovered}", RuntimeWarning, stacklevel=4)

    def _fill_from_segments(self, db: sqlite3.Connection) -> Tuple[int, int]:
        """Fills an empty index (inside the caller's transaction) from the segment trailers:
        every valid block whose parent chain reaches ROOT. Returns (segments, blocks)."""
        found = self._scan_segments()
        now = time.time()
        segs = sorted(found)
        for seg in segs:
            db.execute("INSERT OR REPLACE INTO segments(id, slots) VALUES(?, ?)", (seg, found[seg][0]))
        present = {}
        for seg in segs:
            for slot, (key, parent, dsum) in found[seg][1].items():
                if key not in present:
                    present[key] = (parent, seg, slot, dsum)
        # Keep only blocks whose parent chain reaches ROOT (prefix-closed), counting children.
        keep: Dict[bytes, Tuple[bytes, int, int, int]] = {}

        def reachable(k: bytes, depth: int = 0) -> bool:
            if k in keep:
                return True
            p = present.get(k)
            if p is None or depth > 1_000_000:
                return False
            if p[0] == ROOT or reachable(p[0], depth + 1):
                keep[k] = p
                return True
            return False

        import sys
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old, 10_000 + len(present)))
        try:
            for k in present:
                reachable(k)
        finally:
            sys.setrecursionlimit(old)
        children: Dict[bytes, int] = {}
        for k, (parent, _s, _sl, _d) in keep.items():
            if parent != ROOT:
                children[parent] = children.get(parent, 0) + 1
        for k, (parent, seg, slot, dsum) in keep.items():
            db.execute("INSERT INTO blocks(key, parent, seg, slot, checksum, state, owner, children, last_access) "
                       "VALUES(?,?,?,?,?,?,NULL,?,?)", (k, parent, seg, slot, _i64(dsum), _READY, children.get(k, 0), now))
        used = {(seg, slot) for (_p, seg, slot, _d) in keep.values()}
        for seg in segs:
            for slot in range(found[seg][0]):
                if (seg, slot) not in used:
                    db.execute("INSERT INTO free_slots(seg, slot) VALUES(?, ?)", (seg, slot))
        return len(found), len(keep)

    def _segment_paths(self) -> Dict[int, str]:
        segdir = os.path.join(self.root, _SEG_DIR)
        return {int(name[4:]): os.path.join(segdir, name) for name in os.listdir(segdir)
                if name.startswith("seg-") and name[4:].isdigit()}

    def _scan_segments(self) -> Dict[int, Tuple[int, Dict[int, Tuple[bytes, bytes, int]]]]:
        """seg -> (slots, {slot: (key, parent, data checksum)}) from the trailers (pread)."""
        out: Dict[int, Tuple[int, Dict[int, Tuple[bytes, bytes, int]]]] = {}
        segdir = os.path.join(self.root, _SEG_DIR)
        fb = self.spec.full_block_bytes
        for name in sorted(os.listdir(segdir)):
            if not name.startswith("seg-") or not name[4:].isdigit():
                continue
            seg = int(name[4:])
            p = os.path.join(segdir, name)
            size = os.path.getsize(p)
            nslots = min(self.segment_slots, size // self.slot_bytes)
            blocks: Dict[int, Tuple[bytes, bytes, int]] = {}
            with open(p, "rb") as f:
                for slot in range(nslots):
                    t = _parse_trailer(os.pread(f.fileno(), TRAILER_BYTES, slot * self.slot_bytes + fb))
                    if t is not None and t[2] == fb:
                        blocks[slot] = (t[0], t[1], t[3])
            out[seg] = (nslots, blocks)
        return out

    # --- plumbing ----------------------------------------------------------------------------
    class _Txn:
        def __init__(self, store: "BlockStore") -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            db = self.store._db
            if db is None:
                self.store._lock.release()
                raise StoreError("the BlockStore is closed")
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                self.store._lock.release()
                raise _sql_error(e, self.store.root) from e
            return db

        def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
            db = self.store._db
            try:
                if et is None:
                    try:
                        db.execute("COMMIT")
                    except sqlite3.Error as e:
                        _rollback(db)
                        raise _sql_error(e, self.store.root) from e
                else:
                    _rollback(db)
            finally:
                self.store._lock.release()
            if et is not None and issubclass(et, sqlite3.Error):
                raise _sql_error(ev, self.store.root) from ev

    def _txn(self) -> "BlockStore._Txn":
        return BlockStore._Txn(self)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        with self._lock:
            if self._db is None:
                raise StoreError("the BlockStore is closed")
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise _sql_error(e, self.root) from e

    def _file(self, seg: int) -> Any:
        with self._lock:
            return self._file_locked(seg)

    def _file_locked(self, seg: int) -> Any:
        f = self._files.get(seg)
        if f is None:
            path = self._seg_path(seg)
            try:
                f = self._engine.open(path, "r+", direct=self._direct)
            except OSError as e:
                raise StoreError(e.errno, f"cannot open segment {path}: {e.strerror or e}") from e
            self._files[seg] = f
        return f

    def _seg_path(self, seg: int) -> str:
        return os.path.join(self.root, _SEG_DIR, f"seg-{seg:06d}")

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def capacity_slots(self) -> int:
        return int(self._query("SELECT v FROM meta WHERE k='capacity_slots'")[0][0])

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_slots * self.slot_bytes

    # --- lookup ------------------------------------------------------------------------------
    def keys(self, tokens: Any, parent: bytes = ROOT) -> List[bytes]:
        """chain_keys(tokens, spec.block_tokens, parent)."""
        return chain_keys(tokens, self.spec.block_tokens, parent)

    def contains(self, keys: Sequence[bytes]) -> np.ndarray:
        """Per key: True when the block is present (READY)."""
        ks = _keys(keys)
        have = self._present(ks)
        return np.array([k in have for k in ks], dtype=bool)

    def _present(self, ks: List[bytes]) -> set:
        have: set = set()
        for i in range(0, len(ks), 500):
            part = ks[i:i + 500]
            q = "SELECT key FROM blocks WHERE state=1 AND key IN (%s)" % ",".join("?" * len(part))
            have.update(r[0] for r in self._query(q, part))
        return have

    def lookup(self, tokens: Any = None, *, keys: Optional[Sequence[bytes]] = None, pin: bool = False) -> Lookup:
        """The longest cached prefix of `tokens` (or of a chain of `keys`), in one index query.
        Hits are touched (LRU); ``pin=True`` also pins them for the caller, atomically with the
        lookup, so they cannot be evicted before the caller reads them."""
        if (tokens is None) == (keys is None):
            raise ValueError("lookup: pass exactly one of tokens or keys")
        ks = self.keys(tokens) if keys is None else _keys(keys)
        if not ks:
            return Lookup([], 0, pin)
        if pin:
            with self._txn() as db:
                hits = self._prefix_hits(ks, db)
                self._touch(db, ks[:hits])
                self._pin(db, ks[:hits])
            return Lookup(ks, hits, True)
        hits = self._prefix_hits(ks, None)
        if hits:
            try:
                with self._txn() as db:
                    self._touch(db, ks[:hits])
            except StoreFull:
                pass  # the index cannot be written (full filesystem): the LRU order is advisory
        return Lookup(ks, hits, False)

    def _prefix_hits(self, ks: List[bytes], db: Optional[sqlite3.Connection]) -> int:
        if db is None:
            have = self._present(ks)
        else:
            have = set()
            for i in range(0, len(ks), 500):
                part = ks[i:i + 500]
                q = "SELECT key FROM blocks WHERE state=1 AND key IN (%s)" % ",".join("?" * len(part))
                have.update(r[0] for r in db.execute(q, part))
        hits = 0
        for k in ks:
            if k not in have:
                break
            hits += 1
        return hits

    def _touch(self, db: sqlite3.Connection, ks: List[bytes]) -> None:
        now = time.time()
        for i in range(0, len(ks), 500):
            part = ks[i:i + 500]
            db.execute("UPDATE blocks SET last_access=? WHERE key IN (%s)" % ",".join("?" * len(part)), [now, *part])

    def _lease(self, db: sqlite3.Connection, ks: List[bytes], delta: int) -> None:
        """Adds `delta` (+1 / -1) to this process's pin on each distinct key of `ks`: the pin a
        read holds while it runs. Set-based (one statement per 500 keys)."""
        for i in range(0, len(ks), 500):
            part = list(set(ks[i:i + 500]))
            marks = ",".join("?" * len(part))
            if delta > 0:
                db.execute(f"INSERT INTO pins(key, owner, count) SELECT key, ?, 1 FROM blocks WHERE key IN ({marks}) "
                           "ON CONFLICT(key, owner) DO UPDATE SET count = count + 1", [self.owner, *part])
            else:
                db.execute(f"UPDATE pins SET count = count - 1 WHERE owner=? AND key IN ({marks})", [self.owner, *part])
        if delta < 0:
            db.execute("DELETE FROM pins WHERE owner=? AND count <= 0", (self.owner,))

    # --- pins --------------------------------------------------------------------------------
    def pin(self, keys: Sequence[bytes]) -> np.ndarray:
        """Pins present blocks for this process (counted: pin twice, unpin twice). Pinned
        blocks are never evicted. Returns per key whether it was present (and so pinned)."""
        ks = _keys(keys)
        with self._txn() as db:
            have = {r[0] for r in db.execute(
                "SELECT key FROM blocks WHERE state=1 AND key IN (%s)" % ",".join("?" * len(ks)), ks)} if ks else set()
            self._pin(db, [k for k in ks if k in have])
        return np.array([k in have for k in ks], dtype=bool)

    def _pin(self, db: sqlite3.Connection, ks: List[bytes]) -> None:
        db.executemany("INSERT INTO pins(key, owner, count) VALUES(?, ?, 1) "
                       "ON CONFLICT(key, owner) DO UPDATE SET count = count + 1", [(k, self.owner) for k in ks])

    def unpin(self, keys: Sequence[bytes]) -> None:
        """Drops one pin of this process from each key (keys not pinned are ignored)."""
        ks = _keys(keys)
        with self._txn() as db:
            self._unpin(db, ks)

    def _unpin(self, db: sqlite3.Connection, ks: List[bytes]) -> None:
        db.executemany("UPDATE pins SET count = count - 1 WHERE key=? AND owner=?", [(k, self.owner) for k in ks])
        db.execute("DELETE FROM pins WHERE count <= 0")

    def pinned(self, keys: Sequence[bytes]) -> np.ndarray:
        """Per key: True when any process holds a pin on it."""
        ks = _keys(keys)
        out = np.zeros(len(ks), dtype=bool)
        for i, k in enumerate(ks):
            out[i] = bool(self._query("SELECT 1 FROM pins WHERE key=? AND count > 0 LIMIT 1", (k,)))
        return out

    def reap(self, owner: Optional[str] = None) -> int:
        """Releases the pins and unfinished reservations of `owner`, or (None) of every owner on
        this host whose process is gone. Returns how many rows were released."""
        with self._txn() as db:
            owners = {r[0] for r in db.execute("SELECT DISTINCT owner FROM pins")}
            owners |= {r[0] for r in db.execute("SELECT DISTINCT owner FROM blocks WHERE state<>1")}
            dead = [owner] if owner is not None else [o for o in owners if o != self.owner and not _owner_alive(o, self.host)]
            n = 0
            for o in dead:
                n += db.execute("DELETE FROM pins WHERE owner=?", (o,)).rowcount
                rows = db.execute("SELECT key, parent, seg, slot FROM blocks WHERE state<>1 AND owner=?", (o,)).fetchall()
                for key, parent, seg, slot in rows:
                    self._drop_row(db, key, parent, seg, slot)
                n += len(rows)
        self.counters["reaped"] += n
        return n

    def _drop_row(self, db: sqlite3.Connection, key: bytes, parent: bytes, seg: int, slot: int) -> None:
        db.execute("DELETE FROM blocks WHERE key=?", (key,))
        db.execute("INSERT OR IGNORE INTO free_slots(seg, slot) VALUES(?, ?)", (seg, slot))
        if parent != ROOT:
            db.execute("UPDATE blocks SET children = children - 1 WHERE key=?", (parent,))

    # --- put ---------------------------------------------------------------------------------
    def put(self, keys: Sequence[bytes], parents: Union[Sequence[bytes], bytes, None], region: Any,
            offsets: Any, *, timeout_s: Optional[float] = None) -> np.ndarray:
        """Persists Full Blocks: block i's bytes are ``region[offsets[i] : + full_block_bytes]``.

        ``parents[i]`` is the key of the block before it in its prompt (ROOT for the first); a
        single key or None (ROOT) applies to the first block and the rest are taken as a chain
        (``parents[i] = keys[i-1]``). A block is stored only if its parent is present or stored
        by this call (PUT_NO_PARENT otherwise: its prefix was evicted, or another process is
        still writing it); present keys, and keys another process is writing, are left alone
        (PUT_EXISTS). Returns the per-block outcome (int8). Blocks are durable and
        readable by every process when this returns. Raises StoreFull when slots run out (the
        blocks that got no slot are not stored: nothing partial is left), StoreError on I/O
        failure (the failed blocks are absent).

        Zero-copy when `region` is a Region whose offsets are 4 KiB-aligned and each leaves
        ``slot_bytes`` of room (the trailer is written into the padding after the block);
        otherwise the blocks go through a bounce buffer.
        """
        ks = _keys(keys)
        n = len(ks)
        if parents is None or isinstance(parents, (bytes, bytearray, memoryview)):
            first = ROOT if parents is None else _check_key(parents, "parent")
            ps = [first] + ks[:-1]
        else:
            ps = _keys(parents, "parents")
            if len(ps) != n:
                raise ValueError(f"put: {n} keys but {len(ps)} parents")
        offs = np.asarray(offsets, dtype=np.int64).reshape(-1)
        if offs.size != n:
            raise ValueError(f"put: {n} keys but {offs.size} offsets")
        if len(set(ks)) != n:
            raise ValueError("put: the same key appears twice")
        if n == 0:
            return np.zeros(0, dtype=np.int8)
        view = _host_view(region)
        fb = self.spec.full_block_bytes
        if offs.min() < 0 or int(offs.max()) + fb > view.size:
            raise ValueError(f"put: a block [offset, offset + {fb}) lies outside the {view.size}-byte region")
        zero_copy = (isinstance(region, _core.Region) and region.writable and int(offs.max()) + self.slot_bytes <= view.size
                     and region.address % _ALIGN == 0 and not np.any(offs % _ALIGN) and _disjoint(offs, self.slot_bytes))
        sums = _checksum_seeded(view, np.stack([offs, np.full(n, fb, dtype=np.int64)], axis=1), ks)
        out = np.full(n, PUT_STORED, dtype=np.int8)

        # 1. reserve: parents present (or earlier in this batch), slots allocated, rows WRITING.
        # A parent must be READY: one another process is still writing may yet fail (or its
        # writer die), and its reservation is then dropped without looking for children.
        # Reservations of dead writers are reaped (and the reservation retried once) when
        # they hold keys of this put, or when the store is full.
        self._release_stranded()
        for attempt in (0, 1):
            try:
                with self._txn() as db:
                    have = {}
                    for j in range(0, n, 500):
                        part = ks[j:j + 500]
                        have.update({r[0]: (r[1], r[2]) for r in db.execute(
                            "SELECT key, state, owner FROM blocks WHERE key IN (%s)" % ",".join("?" * len(part)), part)})
                    if attempt == 0 and any(st == _WRITING and o != self.owner and not _owner_alive(o, self.host)
                                            for st, o in have.values()):
                        raise _Reap()
                    ready_parents = set()
                    pset = list({p for p in ps if p != ROOT})
                    for i in range(0, len(pset), 500):
                        part = pset[i:i + 500]
                        ready_parents.update(r[0] for r in db.execute(
                            "SELECT key FROM blocks WHERE state=1 AND key IN (%s)" % ",".join("?" * len(part)), part))
                    todo: List[int] = []
                    batch_keys: set = set()
                    for i, (k, p) in enumerate(zip(ks, ps)):
                        if k in have:
                            out[i] = PUT_EXISTS  # READY, or being written by another process
                            if have[k][0] == _READY:
                                batch_keys.add(k)
                        elif p == ROOT or p in ready_parents or p in batch_keys:
                            todo.append(i)
                            batch_keys.add(k)
                        else:
                            out[i] = PUT_NO_PARENT
                    slots = self._allocate(db, len(todo), protect={ps[i] for i in todo})
                    now = time.time()
                    for i, (seg, slot) in zip(todo, slots):
                        db.execute("INSERT INTO blocks(key, parent, seg, slot, checksum, state, owner, children, last_access) "
                                   "VALUES(?,?,?,?,?,0,?,0,?)", (ks[i], ps[i], seg, slot, _i64(sums[i]), self.owner, now))
                        if ps[i] != ROOT:
                            db.execute("UPDATE blocks SET children = children + 1 WHERE key=?", (ps[i],))
                    # Parents in the batch must not be evicted while their children are written: the
                    # children counts above already make them inner nodes.
                break
            except _Reap:
                out[:] = PUT_STORED
                self.reap()
            except StoreFull:
                if attempt or not self.reap():
                    raise
                out[:] = PUT_STORED
        if not todo:
            return out
        placed = dict(zip(todo, slots))

        # 2. write data + trailer, then make it durable.
        failed: Dict[int, BaseException] = {}
        bounce = None
        reqs: List[Tuple[int, List[int], Any]] = []
        try:
            if zero_copy:
                src, src_offs = region, offs
            else:
                bounce = self._engine.alloc(len(todo) * self.slot_bytes)
                src, src_offs = bounce, np.zeros(n, dtype=np.int64)
                bv = bounce.numpy()
                for j, i in enumerate(todo):
                    src_offs[i] = j * self.slot_bytes
                    bv[j * self.slot_bytes: j * self.slot_bytes + fb] = view[offs[i]: offs[i] + fb]
            sv = _host_view(src)
            for i in todo:
                o = int(src_offs[i]) + fb
                sv[o:o + TRAILER_BYTES] = np.frombuffer(_make_trailer(ks[i], ps[i], fb, int(sums[i])), dtype=np.uint8)
                sv[o + TRAILER_BYTES: int(src_offs[i]) + self.slot_bytes] = 0
            by_seg: Dict[int, List[int]] = {}
            for i in todo:
                by_seg.setdefault(placed[i][0], []).append(i)
            for seg, idx in by_seg.items():
                f = self._file(seg)
                batch = entries(np.array([placed[i][1] for i in idx], dtype=np.int64) * self.slot_bytes,
                                src_offs[idx], self.slot_bytes)
                reqs.append((seg, idx, self._engine.write(f, src, batch, timeout_s=timeout_s, traffic_class=self._traffic_class)))
            for seg, idx, r in reqs:
                r.wait(None)
                r.wait_quiesced(None)
                st = r.status
                err = None
                try:
                    r.check()
                except Exception as e:  # noqa: BLE001 - kept as the cause per block
                    err = e
                for j, i in enumerate(idx):
                    if st[j] != 0:
                        failed[i] = err or StoreError(f"write of block {i} failed: {_entry_error(int(st[j]))}")
            for seg in by_seg:
                if any(i not in failed for i in by_seg[seg]):
                    try:
                        self._files[seg].sync(data_only=True)
                    except OSError as e:
                        for i in by_seg[seg]:
                            failed.setdefault(i, e)
        except BaseException as e:
            # Before the slots go back to the free list and the bounce buffer is freed, every
            # write already submitted must have ended.
            for _seg, _idx, r in reqs:
                r.cancel()
                r.wait_quiesced(None)
            for i in todo:
                failed.setdefault(i, e)
            raise_later: Optional[BaseException] = e
        else:
            raise_later = None
        finally:
            if bounce is not None:
                bounce.close()

        # 3. commit: READY, or release the failed ones (and any of their children in this batch).
        failed_keys = {ks[i] for i in failed}
        try:
            with self._txn() as db:
                for i in todo:
                    if ks[i] in failed_keys or ps[i] in failed_keys:
                        failed_keys.add(ks[i])
                        self._release_own(db, ks[i], *placed[i])
                    elif db.execute("UPDATE blocks SET state=1, owner=NULL WHERE key=? AND state=0 AND owner=?",
                                    (ks[i], self.owner)).rowcount == 0:
                        # DOOMED meanwhile: an ancestor was found corrupt and dropped (see
                        # _drop_subtrees). The slot was kept for this writer to release.
                        failed_keys.add(ks[i])
                        failed.setdefault(i, StoreError(f"block {ks[i].hex()} was dropped while being written: "
                                                        "an ancestor failed verification"))
                        self._release_own(db, ks[i], *placed[i])
        except StoreError as e:
            # The outcome could not be recorded (the index cannot be written: a full
            # filesystem). The rows stay WRITING, owned by this live process, so no reap would
            # ever free them: remember them, the next put or close releases them.
            with self._lock:
                self._stranded.extend((ks[i], ps[i]) + tuple(placed[i]) for i in todo)
            if raise_later is not None:
                raise e from raise_later
            raise
        stored = [i for i in todo if ks[i] not in failed_keys]
        self.counters["puts"] += len(stored)
        self.counters["put_bytes"] += len(stored) * fb
        if raise_later is not None:
            raise raise_later
        if failed_keys:
            first = next(iter(failed.values()))
            raise StoreError(f"put: {len(failed_keys)} of {len(todo)} blocks could not be written to {self.root} "
                             f"and are absent: {first}") from first
        return out

    def _release_stranded(self) -> None:
        """Drops the reservations of this store's puts whose commit failed (still WRITING,
        still ours, still at the slot reserved); kept for later if the index cannot be written."""
        with self._lock:
            snap = list(self._stranded)
        if not snap:
            return
        try:
            with self._txn() as db:
                self._drop_stranded(db, snap)
        except StoreError:
            return
        with self._lock:  # other threads may have added entries meanwhile: keep those
            del self._stranded[:len(snap)]

    def _drop_stranded(self, db: sqlite3.Connection, entries: Optional[list] = None) -> None:
        for key, _parent, seg, slot in (self._stranded if entries is None else entries):
            self._release_own(db, key, seg, slot)

    def _release_own(self, db: sqlite3.Connection, key: bytes, seg: int, slot: int) -> None:
        """Drops this store's unfinished reservation of `key` at (seg, slot), if the index still
        has it (WRITING, or DOOMED and so detached), lowering the parent's child count only
        when the row still hangs under it."""
        row = db.execute("SELECT state, owner, seg, slot, parent FROM blocks WHERE key=?", (key,)).fetchone()
        if row is not None and row[0] != _READY and tuple(row[1:4]) == (self.owner, seg, slot):
            self._drop_row(db, key, row[4], seg, slot)

    def _allocate(self, db: sqlite3.Connection, n: int, protect: set) -> List[Tuple[int, int]]:
        """n free slots: the free list, then new segment space up to the capacity, then LRU
        eviction of unpinned READY leaves. StoreFull (nothing changed) if that is not enough."""
        if n == 0:
            return []
        cap = int(db.execute("SELECT v FROM meta WHERE k='capacity_slots'").fetchone()[0])
        if n > cap:
            raise StoreFull(f"{self.root}: a put of {n} new blocks exceeds the capacity of {cap} slots "
                            f"({cap * self.slot_bytes} bytes)")
        got: List[Tuple[int, int]] = []

        def take_free(k: int) -> None:
            rows = db.execute("SELECT seg, slot FROM free_slots ORDER BY seg, slot LIMIT ?", (k,)).fetchall()
            for seg, slot in rows:
                db.execute("DELETE FROM free_slots WHERE seg=? AND slot=?", (seg, slot))
            got.extend(rows)

        used = db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]
        # Shrunk capacity: evict down to it first.
        if used + n > cap:
            self._evict(db, used + n - cap, protect)
            used = db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]
        take_free(min(n, max(0, cap - used)))
        while len(got) < n and used + len(got) < cap:
            if not self._grow(db, min(n - len(got), cap - used - len(got))):
                break
            take_free(min(n - len(got), cap - used - len(got)))
        if len(got) < n and self._evict(db, n - len(got), protect):
            take_free(n - len(got))  # the filesystem filled up before the capacity: reuse LRU slots
        if len(got) < n:
            writing = db.execute("SELECT COUNT(*) FROM blocks WHERE state=0").fetchone()[0]
            pinned = db.execute("SELECT COUNT(DISTINCT key) FROM pins WHERE count>0").fetchone()[0]
            segs = db.execute("SELECT COALESCE(SUM(slots), 0) FROM segments").fetchone()[0]
            raise StoreFull(
                f"{self.root}: no room for {n} more blocks: {used} of {cap} slots hold blocks that cannot be "
                f"evicted ({writing} being written, {pinned} pinned, the rest inner trie nodes of those), "
                f"and {segs} slots exist on disk" + (" (the filesystem is full)" if segs < cap else ""))
        return got

    def _grow(self, db: sqlite3.Connection, want: int) -> bool:
        """Adds segment space for at least min(want, segment_slots) slots: extends the last
        segment if it is short, else creates the next one. False when the filesystem is full."""
        row = db.execute("SELECT id, slots FROM segments ORDER BY id DESC LIMIT 1").fetchone()
        if row is not None and row[1] < self.segment_slots:
            seg, have = row
        else:
            seg, have = (0 if row is None else row[0] + 1), 0
        new = min(self.segment_slots, have + max(want, 1))
        path = self._seg_path(seg)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, new * self.slot_bytes)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno in (28, 122):  # ENOSPC, EDQUOT
                return False
            raise StoreError(e.errno, f"cannot create segment {path}: {e.strerror}") from e
        if have == 0:
            _fsync_dir(os.path.dirname(path))
        db.execute("INSERT OR REPLACE INTO segments(id, slots) VALUES(?, ?)", (seg, new))
        db.executemany("INSERT OR IGNORE INTO free_slots(seg, slot) VALUES(?, ?)", [(seg, s) for s in range(have, new)])
        return True  # an open File of this segment sees the new size: sizes are never cached

    def _evict(self, db: sqlite3.Connection, n: int, protect: set = frozenset()) -> int:
        """Frees up to n slots: least recently used READY leaves with no pin (any owner)."""
        done = 0
        while done < n:
            rows = db.execute(
                "SELECT key, parent, seg, slot FROM blocks b WHERE children=0 AND state=1 "
                "AND NOT EXISTS (SELECT 1 FROM pins p WHERE p.key=b.key AND p.count>0) "
                "ORDER BY last_access LIMIT ?", (n - done + len(protect),)).fetchall()
            rows = [r for r in rows if r[0] not in protect][: n - done]
            if not rows:
                break
            for key, parent, seg, slot in rows:
                self._drop_row(db, key, parent, seg, slot)
            done += len(rows)
        self.counters["evictions"] += done
        return done

    def evict(self, nbytes: int) -> int:
        """Evicts enough blocks to free `nbytes` of slots (LRU leaves, never pinned or being
        written; fewer when nothing else is evictable); returns the number evicted."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._txn() as db:
            return self._evict(db, -(-nbytes // self.slot_bytes))

    def remove(self, keys: Sequence[bytes]) -> int:
        """Drops blocks and their descendants from the index; a key whose subtree holds a
        pinned block or one being written is left alone. Returns how many blocks were dropped."""
        ks = _keys(keys)
        with self._txn() as db:
            n = 0
            for k in ks:
                sub, stack = [], [k]
                while stack:
                    c = stack.pop()
                    if db.execute("SELECT 1 FROM blocks WHERE key=?", (c,)).fetchone() is None:
                        continue
                    sub.append(c)
                    stack.extend(r[0] for r in db.execute("SELECT key FROM blocks WHERE parent=?", (c,)))
                busy = any(db.execute("SELECT 1 FROM blocks WHERE key=? AND state=0", (c,)).fetchone()
                           or db.execute("SELECT 1 FROM pins WHERE key=? AND count>0", (c,)).fetchone() for c in sub)
                if sub and not busy:
                    n += self._drop_subtrees(db, [k])
            return n

    def _drop_subtrees(self, db: sqlite3.Connection, ks: List[bytes]) -> int:
        n = 0
        stack = list(ks)
        while stack:
            k = stack.pop()
            row = db.execute("SELECT parent, seg, slot, state FROM blocks WHERE key=?", (k,)).fetchone()
            if row is None or row[3] == _DOOMED:
                continue
            stack.extend(r[0] for r in db.execute("SELECT key FROM blocks WHERE parent=?", (k,)))
            db.execute("DELETE FROM pins WHERE key=?", (k,))
            if row[3] == _WRITING:
                # Still being written: its writer owns the slot until it ends, so mark the row
                # DOOMED rather than free the slot under the write; the writer's commit then
                # finds it and releases it (or the reaper, if the writer died).
                # Detached (parent ROOT): the parent row is gone, and a later row of the same key
                # must not have its child count lowered when this one is released.
                db.execute("UPDATE blocks SET state=?, parent=? WHERE key=?", (_DOOMED, ROOT, k))
                continue
            self._drop_row(db, k, row[0], row[1], row[2])
            n += 1
        return n

    # --- read --------------------------------------------------------------------------------
    def read(self, keys: Sequence[bytes], region: Any, region_offsets: Any, *, traffic_class: Optional[str] = None,
             timeout_s: Optional[float] = None) -> BlockRead:
        """Reads Full Blocks into `region` (a Region or writable host buffer): block i's slot
        (``slot_bytes``: the block, then its trailer) lands at ``region_offsets[i]``. Returns at
        once; ``BlockRead.result()`` waits and verifies. The blocks are pinned for this process
        while the read runs, and touched (LRU)."""
        ks = _keys(keys)
        offs = np.asarray(region_offsets, dtype=np.int64).reshape(-1)
        if offs.size != len(ks):
            raise ValueError(f"read: {len(ks)} keys but {offs.size} region offsets")
        view = _host_view(region, writable=True)
        if ks and (int(offs.min()) < 0 or int(offs.max()) + self.slot_bytes > view.size):
            raise ValueError(f"read: a slot [offset, offset + {self.slot_bytes}) lies outside the {view.size}-byte region")
        if not _disjoint(offs, self.slot_bytes):
            raise ValueError(f"read: region offsets must be at least slot_bytes ({self.slot_bytes}) apart")
        rows: List[Tuple[int, int, int]] = []
        found: Dict[bytes, Tuple[int, int, int]] = {}

        def find(execute: Any) -> None:
            for i in range(0, len(ks), 500):
                part = ks[i:i + 500]
                for k, seg, slot, cs in execute(
                        "SELECT key, seg, slot, checksum FROM blocks WHERE state=1 AND key IN (%s)" % ",".join("?" * len(part)), part):
                    found[k] = (seg, slot, cs & 0xFFFFFFFFFFFFFFFF)

        leased = True
        try:
            with self._txn() as db:
                find(db.execute)
                present = [k for k in ks if k in found]
                self._touch(db, present)
                self._lease(db, present, +1)
        except StoreFull:
            # The index cannot be written (its filesystem is full): read without pins. A slot
            # recycled meanwhile fails verification, so a wrong block is still never served.
            leased = False
            found.clear()
            find(self._query)
            present = [k for k in ks if k in found]
        missing = [i for i, k in enumerate(ks) if k not in found]
        rows = [found.get(k, (-1, -1, 0)) for k in ks]
        by_seg: Dict[int, List[int]] = {}
        for i, (seg, _slot, _cs) in enumerate(rows):
            if seg >= 0:
                by_seg.setdefault(seg, []).append(i)
        reqs = []
        try:
            for seg, idx in by_seg.items():
                f = self._file(seg)
                batch = entries(np.array([rows[i][1] for i in idx], dtype=np.int64) * self.slot_bytes, offs[idx], self.slot_bytes)
                reqs.append((self._engine.read(f, region, batch, timeout_s=timeout_s,
                                               traffic_class=traffic_class or self._traffic_class), np.array(idx)))
        except BaseException:
            for r, _ in reqs:
                r.cancel()
                r.wait_quiesced(None)
            if leased:
                with self._txn() as db:
                    self._lease(db, present, -1)
            raise
        self.counters["reads"] += len(present)
        self.counters["read_bytes"] += len(present) * self.spec.full_block_bytes
        br = BlockRead(self, ks, view, offs, rows, reqs, missing)
        br._leased = leased
        return br

    def _release_read(self, ks: List[bytes], bad: List[int], rows: List[Tuple[int, int, int]], leased: bool = True) -> None:
        present = [k for k, r in zip(ks, rows) if r[0] >= 0]
        self.counters["corrupt"] += len(bad)
        if not leased and not bad:
            return
        try:
            with self._txn() as db:
                if leased:
                    self._lease(db, present, -1)
                if bad:
                    # Only drop the block if the index still maps it to the slot we read: another
                    # process may have dropped and replaced it meanwhile.
                    drop = []
                    for i in bad:
                        row = db.execute("SELECT seg, slot FROM blocks WHERE key=?", (ks[i],)).fetchone()
                        if row is not None and (row[0], row[1]) == rows[i][:2]:
                            drop.append(ks[i])
                    self._drop_subtrees(db, drop)
        except StoreFull:
            pass  # the index cannot be written: the blocks read are fine; a corrupt one fails again

    def get(self, keys: Sequence[bytes], *, timeout_s: Optional[float] = None) -> np.ndarray:
        """Reads blocks into a new array of shape (N, num_layers, block_tokens, bpt), uint8."""
        ks = _keys(keys)
        buf = self._engine.alloc(max(1, len(ks)) * self.slot_bytes)
        try:
            self.read(ks, buf, np.arange(len(ks), dtype=np.int64) * self.slot_bytes, timeout_s=timeout_s).result()
            v = buf.numpy().reshape(-1, self.slot_bytes)[: len(ks), : self.spec.full_block_bytes]
            return v.copy().reshape((len(ks),) + self.spec.full_block_shape)
        finally:
            buf.close()

    def verify(self, *, batch: int = 64) -> List[bytes]:
        """Reads every block and checks it (a scrub). Corrupt ones are dropped as on any read;
        returns their keys."""
        allk = [r[0] for r in self._query("SELECT key FROM blocks WHERE state=1")]
        bad: List[bytes] = []
        buf = self._engine.alloc(batch * self.slot_bytes)
        try:
            for i in range(0, len(allk), batch):
                part = allk[i:i + batch]
                try:
                    self.read(part, buf, np.arange(len(part), dtype=np.int64) * self.slot_bytes).result()
                except BlockCorrupt as e:
                    bad.extend(e.keys)
                except BlockMissing:
                    pass  # dropped meanwhile (evicted, or a corrupt ancestor's subtree)
        finally:
            buf.close()
        return bad

    # --- facts -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """blocks, writing, pinned, free_slots, segments, capacity_slots, slot_bytes, bytes
        (of READY blocks' data), and this object's counters (puts, reads, evictions, corrupt,
        reaped)."""
        q = self._query
        return {
            "blocks": q("SELECT COUNT(*) FROM blocks WHERE state=1")[0][0],
            "writing": q("SELECT COUNT(*) FROM blocks WHERE state=0")[0][0],
            "pinned": q("SELECT COUNT(DISTINCT key) FROM pins WHERE count>0")[0][0],
            "free_slots": q("SELECT COUNT(*) FROM free_slots")[0][0],
            "segments": q("SELECT COUNT(*) FROM segments")[0][0],
            "capacity_slots": self.capacity_slots,
            "slot_bytes": self.slot_bytes,
            "bytes": q("SELECT COUNT(*) FROM blocks WHERE state=1")[0][0] * self.spec.full_block_bytes,
            **self.counters,
        }

    def __len__(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM blocks WHERE state=1")[0][0])

    # --- lifetime ----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Releases this process's pins, closes the segment files and the index, and the
        engine if the store made it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            if self._db is not None:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.execute("DELETE FROM pins WHERE owner=?", (self.owner,))
                    self._drop_stranded(self._db)
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    pass
            for f in self._files.values():
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - best effort
                    pass
            self._files.clear()
            if self._db is not None:
                self._db.close()
                self._db = None
        if self._own_engine and self._engine is not None:
            self._engine.close()

    def __enter__(self) -> "BlockStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<dpmove.kv.BlockStore {self.root} {self.spec.name} {'closed' if self._closed else ''}>"


# --- helpers ---------------------------------------------------------------------------------

def _i64(v: Any) -> int:
    """A uint64 as SQLite's signed 64-bit integer."""
    v = int(v)
    return v - (1 << 64) if v >= (1 << 63) else v


def _disjoint(offs: np.ndarray, width: int) -> bool:
    if offs.size < 2:
        return True
    s = np.sort(offs)
    return bool(np.all(np.diff(s) >= width))


def _host_view(obj: Any, writable: bool = False) -> np.ndarray:
    """A flat uint8 view of a host Region or buffer."""
    if isinstance(obj, _core.Region):
        if obj.location != "host":
            raise ValueError("the block store reads and writes host memory; got a device region")
        if writable and not obj.writable:
            raise ValueError("read: the region is read-only")
        return obj.numpy().reshape(-1).view(np.uint8)
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(f"expected a dpmove Region or a buffer, got {type(obj).__name__}") from None
    if writable and mv.readonly:
        raise ValueError("read: the buffer is read-only")
    if not mv.c_contiguous:
        raise ValueError("the buffer must be C-contiguous")
    return np.frombuffer(mv.cast("B"), dtype=np.uint8)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rollback(db: sqlite3.Connection) -> None:
    """ROLLBACK, if a transaction is still open: SQLite has already rolled back after some
    errors (SQLITE_FULL, SQLITE_IOERR), and a second error must not hide the first."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _is_corruption(e: BaseException) -> bool:
    """Whether an error opening the index says that the file itself is damaged (then it is
    rebuilt), as opposed to a full disk, an I/O error, a lock or permissions (then it is not)."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
    msg = str(e)
    return "quick_check" in msg or "malformed" in msg or "not a database" in msg


def _sql_error(e: BaseException, root: str) -> StoreError:
    msg = str(e)
    if "full" in msg:
        err: StoreError = StoreFull(28, f"the index of {root} cannot grow: {msg}")
    elif "readonly" in msg or "read-only" in msg:
        err = StoreError(30, f"the index of {root} is read-only: {msg}")
    elif "malformed" in msg or "not a database" in msg:
        err = IndexCorrupt(f"the index of {root} is corrupt: {msg}; reopen the store to rebuild it from the segments")
    else:
        err = StoreError(f"the index of {root}: {msg}")
    return err
