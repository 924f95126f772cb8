"""The block store (dpmove.kv.store): keys, round trips, put semantics, lookup, eviction, bad input.

References: what a block must hold is the data the test put (random bytes, or
``kv_store_writer.block_bytes(key)``), what the segment holds is read with plain ``os.pread`` at
the slot the index names (read through a separate SQLite connection), keys are recomputed with
hashlib's BLAKE2b and checksums with the ``xxhash`` package. After each test that changes the
store, ``check_index`` asserts the index's invariants (every slot free or used once, presence
prefix-closed, children counts right). Every test that does I/O runs on both backends.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash
from conftest import aligned_array, fill_filesystem, is_root, mounted, rand_bytes
from dpmove.kv.model import ModelSpec, get_model
from dpmove.kv.store import (
    PUT_EXISTS,
    PUT_NO_PARENT,
    PUT_STORED,
    ROOT,
    BlockCorrupt,
    BlockMissing,
    BlockStore,
    StoreError,
    StoreFull,
    chain_keys,
)
from kv_store_writer import block_bytes, check_index, fill, index_rows

TINY = get_model("tiny")          # Full Block 2,048 B, slot 4,096 B
TINY_ODD = get_model("tiny-odd")  # Full Block 1,500 B, slot 4,096 B
MULTI = ModelSpec("multi-page", 3, 1000, 7)  # Full Block 21,000 B over 6 pages, slot 24,576 B
WRITER = str(Path(__file__).with_name("kv_store_writer.py"))


@pytest.fixture
def open_store(make_engine, tmp_path: Path):
    """open_store(root=tmp_path/"store", spec=TINY_ODD, **BlockStore options): stores on one
    engine of the test's backend, closed at teardown (before the engine's own checks)."""
    made: list = []
    eng: list = []

    def make(root=None, spec: ModelSpec = TINY_ODD, **kw) -> BlockStore:
        if not eng:
            eng.append(make_engine())
        kw.setdefault("engine", eng[0])
        st = BlockStore(tmp_path / "store" if root is None else root, spec, **kw)
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()


def tokens(rng: np.random.Generator, nblocks: int, spec: ModelSpec = TINY_ODD, extra: int = 0) -> np.ndarray:
    return rng.integers(0, 1 << 40, nblocks * spec.block_tokens + extra, dtype=np.int64)


def put_keys(store: BlockStore, keys: list, parent=None) -> np.ndarray:
    """Puts blocks holding block_bytes(key) (bounce path: a packed numpy buffer)."""
    fb = store.spec.full_block_bytes
    return store.put(keys, parent, fill(keys, fb, fb), np.arange(len(keys)) * fb)


def assert_holds(store: BlockStore, keys: list) -> None:
    got = store.get(keys)
    for k, g in zip(keys, got):
        np.testing.assert_array_equal(g.reshape(-1), block_bytes(k, store.spec.full_block_bytes))


def slot_bytes_on_disk(root: Path, store: BlockStore, key: bytes) -> bytes:
    """The slot the index names for `key`, read with os.pread."""
    b = index_rows(root)["blocks"][key]
    with open(root / "segments" / f"seg-{b['seg']:06d}", "rb") as f:
        return os.pread(f.fileno(), store.slot_bytes, b["slot"] * store.slot_bytes)


def flip(path: Path, offset: int, n: int = 1) -> None:
    with open(path, "r+b") as f:
        old = os.pread(f.fileno(), n, offset)
        os.pwrite(f.fileno(), bytes(b ^ 0xFF for b in old), offset)


def seg_path(root: Path, key: bytes) -> tuple:
    b = index_rows(root)["blocks"][key]
    return root / "segments" / f"seg-{b['seg']:06d}", b["slot"]


@contextlib.contextmanager
def counting(obj, method: str):
    """Counts the calls of obj.method meanwhile (yields a one-element list)."""
    n = [0]
    real = getattr(obj, method)

    def counted(*a, **kw):
        n[0] += 1
        return real(*a, **kw)

    setattr(obj, method, counted)
    try:
        yield n
    finally:
        delattr(obj, method)


@contextlib.contextmanager
def hung_writer(root: Path, args: dict):
    """A child process (kv_store_writer.py hang) that holds pins and WRITING reservations in
    the store; yields its owner name, then SIGKILLs it and waits until it is gone."""
    with subprocess.Popen([sys.executable, WRITER, "hang", str(root), json.dumps(args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
        try:
            line = child.stdout.readline().decode()
            if not line.startswith("reserved "):
                child.wait(30)
                pytest.fail(f"the writer did not reserve: {line!r} {child.stderr.read().decode()}")
            yield line.split()[1]
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL


# --- keys ------------------------------------------------------------------------------------

def test_chain_keys_reference(rng) -> None:
    t = tokens(rng, 3, TINY)
    keys = chain_keys(t, 4)
    prev = bytes(16)
    for i in range(3):
        prev = hashlib.blake2b(prev + t[4 * i: 4 * i + 4].astype("<i8").tobytes(), digest_size=16).digest()
        assert keys[i] == prev
    assert ROOT == bytes(16)


def test_chain_keys_properties(rng) -> None:
    t = tokens(rng, 5, TINY, extra=3)  # 5 full blocks and a partial one
    keys = chain_keys(t, 4)
    assert len(keys) == 5 and all(isinstance(k, bytes) and len(k) == 16 for k in keys)
    assert len(set(keys)) == 5
    assert chain_keys(t.copy(), 4) == keys                      # deterministic
    assert chain_keys(t[:12], 4) == keys[:3]                    # prefix property
    assert chain_keys(t[:14], 4) == keys[:3]                    # a partial block has no key
    assert chain_keys(t[:3], 4) == [] and chain_keys([], 4) == []
    assert chain_keys(t[8:], 4, parent=keys[1]) == keys[2:]     # chaining from a parent
    small = rng.integers(0, 30_000, 16)
    ref = chain_keys(small.astype(np.int64), 4)
    for dt in (np.int16, np.uint16, np.int32, np.uint32, np.uint64):
        assert chain_keys(small.astype(dt), 4) == ref, dt      # dtype-independent
    assert chain_keys(small.tolist(), 4) == ref
    other = chain_keys(t, 4, parent=b"\x01" * 16)               # another parent: all keys differ
    assert not set(other) & set(keys)
    t2 = t.copy()
    t2[9] += 1                                                  # one token changed in block 2
    k2 = chain_keys(t2, 4)
    assert k2[:2] == keys[:2] and not set(k2[2:]) & set(keys)
    assert chain_keys(t, 2)[:2] != keys[:2]                     # the block size is part of a key


@pytest.mark.parametrize("call,exc,match", [
    (lambda: chain_keys([1, 2], 0), ValueError, "block_tokens must be a positive int"),
    (lambda: chain_keys([1, 2], -1), ValueError, "block_tokens"),
    (lambda: chain_keys([1, 2], 2.0), ValueError, "block_tokens"),
    (lambda: chain_keys([1.0, 2.0], 2), TypeError, "tokens must be integers"),
    (lambda: chain_keys(np.zeros((2, 4), dtype=np.int64), 4), ValueError, "1-D"),
    (lambda: chain_keys([1, 2], 2, parent=b"x" * 15), TypeError, "parent must be 16 bytes"),
    (lambda: chain_keys([1, 2], 2, parent="x" * 16), TypeError, "parent must be 16 bytes"),
])
def test_chain_keys_bad_input(call, exc, match: str) -> None:
    with pytest.raises(exc, match=match):
        call()


# --- geometry --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,slot", [
    (TINY, 4096), (TINY_ODD, 4096), (MULTI, 24_576), (ModelSpec("edge", 1, 4032, 1), 4096),
    (ModelSpec("edge2", 1, 4033, 1), 8192), (get_model("deepseek-v3.2"), 3_080_192),
    (get_model("qwen2.5-32b"), (16 << 20) + 4096),
])
def test_slot_bytes(open_store, spec: ModelSpec, slot: int) -> None:
    st = open_store(spec=spec)
    assert st.slot_bytes == slot >= spec.full_block_bytes + 64
    assert st.slot_bytes % 4096 == 0
    meta = json.loads((Path(st.root) / "dpmove-store.json").read_text())
    assert meta["slot_bytes"] == slot and meta["num_layers"] == spec.num_layers
    assert len(st) == 0 and st.stats()["segments"] == 0  # nothing allocated until a put


# --- round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [TINY_ODD, MULTI], ids=lambda s: s.name)
def test_round_trip_across_restart(open_store, tmp_path: Path, rng, spec: ModelSpec) -> None:
    root = tmp_path / "store"
    st = open_store(spec=spec, capacity_bytes=64 << 20, segment_slots=5)
    fb = spec.full_block_bytes
    blocks: dict = {}
    parents: dict = {}
    for _ in range(6):  # six prompts, some sharing a prefix with an earlier one
        base = tokens(rng, int(rng.integers(1, 4)), spec)
        keys = st.keys(base)
        data = rand_bytes(rng, len(keys) * fb)
        assert (st.put(keys, None, data, np.arange(len(keys)) * fb) == PUT_STORED).all()
        more = st.keys(np.concatenate([base, tokens(rng, 2, spec)]))[len(keys):]
        data2 = rand_bytes(rng, 2 * fb)
        assert (st.put(more, keys[-1], data2, [0, fb]) == PUT_STORED).all()
        for i, k in enumerate(keys + more):
            blocks[k] = np.concatenate([data, data2])[i * fb: (i + 1) * fb]
            parents[k] = ([ROOT] + keys + more)[i]
    assert len(st) == len(blocks) == st.stats()["blocks"]
    st.close()
    st = open_store(spec=spec)  # a new store object on the same directory
    assert st.capacity_bytes == (64 << 20) // st.slot_bytes * st.slot_bytes
    keys = list(blocks)
    rng.shuffle(keys)
    got = st.get(keys)
    assert got.shape == (len(keys),) + spec.full_block_shape and got.dtype == np.uint8
    for k, g in zip(keys, got):
        np.testing.assert_array_equal(g.reshape(-1), blocks[k])
        raw = slot_bytes_on_disk(root, st, k)  # the reference: the segment file at the slot
        assert raw[:fb] == blocks[k].tobytes()
        magic, key, parent, n, flags, dsum, tsum = struct.unpack("<8s16s16sIIQQ", raw[fb: fb + 64])
        assert (magic, key, parent, n, flags) == (b"DPMVBLK1", k, parents[k], fb, 0)
        assert dsum == xxhash.xxh3_64_intdigest(blocks[k].tobytes(), seed=int.from_bytes(k[:8], "little"))
        assert tsum == xxhash.xxh3_64_intdigest(raw[fb: fb + 56])
        assert raw[fb + 64:] == bytes(st.slot_bytes - fb - 64)  # zero padding
        assert index_rows(root)["blocks"][k]["checksum"] & (2**64 - 1) == dsum
    check_index(root)
    # read() into a Region at scattered offsets, and into a page-aligned numpy buffer
    region = st.engine.alloc(8 * st.slot_bytes)
    offs = np.array([5, 0, 3]) * st.slot_bytes
    st.read(keys[:3], region, offs).result()
    for k, o in zip(keys[:3], offs):
        np.testing.assert_array_equal(region.numpy()[o: o + fb], blocks[k])
    arr = aligned_array(3 * st.slot_bytes)
    r = st.read(keys[3:6], arr, np.arange(3) * st.slot_bytes)
    assert r.wait(30)
    r.result()
    assert r.ok.all() and len(r) == 3
    for i, k in enumerate(keys[3:6]):
        np.testing.assert_array_equal(arr[i * st.slot_bytes: i * st.slot_bytes + fb], blocks[k])
    assert st.stats()["pinned"] == 0  # reads release their pins
    assert st.verify() == []


def test_get_missing_and_empty(open_store, rng) -> None:
    st = open_store()
    keys = st.keys(tokens(rng, 3))
    put_keys(st, keys[:2])
    assert st.get([]).shape == (0,) + TINY_ODD.full_block_shape
    with pytest.raises(BlockMissing, match=keys[2].hex()) as info:
        st.get(keys)
    assert isinstance(info.value, KeyError)
    assert st.stats()["pinned"] == 0
    assert_holds(st, keys[:2])


# --- put -------------------------------------------------------------------------------------

def test_put_outcomes(open_store, tmp_path: Path, rng) -> None:
    st = open_store()
    keys = st.keys(tokens(rng, 4))
    fb = TINY_ODD.full_block_bytes
    np.testing.assert_array_equal(put_keys(st, keys[:2]), [PUT_STORED] * 2)
    # present keys are left alone; the chain continues from them
    np.testing.assert_array_equal(put_keys(st, keys), [PUT_EXISTS, PUT_EXISTS, PUT_STORED, PUT_STORED])
    assert st.counters["puts"] == 4
    # a block whose parent is absent is refused, and so is everything chained after it
    orphan = st.keys(tokens(rng, 2), parent=b"\x07" * 16)
    np.testing.assert_array_equal(put_keys(st, orphan, b"\x07" * 16), [PUT_NO_PARENT] * 2)
    # explicit parents: two children of one block (a branch), and a child listed before its parent
    a, b = st.keys(tokens(rng, 1), parent=keys[1]), st.keys(tokens(rng, 1), parent=keys[1])
    p = st.keys(tokens(rng, 1))
    c = st.keys(tokens(rng, 1), parent=p[0])
    out = st.put(a + b + c + p, [keys[1], keys[1], p[0], ROOT], fill(a + b + c + p, fb, fb), np.arange(4) * fb)
    np.testing.assert_array_equal(out, [PUT_STORED, PUT_STORED, PUT_NO_PARENT, PUT_STORED])
    assert st.contains(keys + a + b + c + p).tolist() == [True] * 6 + [False, True]
    assert st.put([], None, np.zeros(0, dtype=np.uint8), []).shape == (0,)
    ix = check_index(tmp_path / "store")
    assert ix["blocks"][keys[1]]["children"] == 3
    assert_holds(st, keys + a + b + p)
    with pytest.raises(ValueError, match="the same key appears twice"):
        put_keys(st, [keys[0], keys[0]])
    with pytest.raises(ValueError, match="2 keys but 3 parents"):
        st.put(keys[:2], [ROOT] * 3, np.zeros(2 * fb, np.uint8), [0, fb])
    assert st.stats()["writing"] == 0


@pytest.mark.parametrize("spec", [TINY_ODD, MULTI], ids=lambda s: s.name)
def test_zero_copy_and_bounce_store_identical_bytes(open_store, tmp_path: Path, rng, spec: ModelSpec) -> None:
    """The same blocks through a Region at slot stride (zero-copy: the trailer goes into the
    padding), a Region at Full Block stride, an unaligned registered buffer and a plain numpy
    array (bounce buffer) land as the same slot bytes."""
    fb = spec.full_block_bytes
    keys = chain_keys(tokens(rng, 3, spec), spec.block_tokens)
    data = rand_bytes(rng, 3 * fb)
    stores, allocs = [], []
    for name in ("zero-copy", "region-packed", "unaligned", "numpy"):
        st = open_store(tmp_path / name, spec=spec)
        sb = st.slot_bytes
        eng = st.engine
        if name == "zero-copy":
            src = eng.alloc(3 * sb)
            offs = np.arange(3) * sb
            for i in range(3):
                src.numpy()[i * sb: i * sb + fb] = data[i * fb: (i + 1) * fb]
            src.numpy()[:] = np.where(np.arange(3 * sb) % sb < fb, src.numpy(), 0xAB)  # junk padding
        elif name == "region-packed":
            src = eng.alloc(3 * fb)
            src.numpy()[:] = data
            offs = np.arange(3) * fb
        elif name == "unaligned":
            raw = np.zeros(3 * sb + 8192, dtype=np.uint8)
            skip = (-raw.ctypes.data) % 4096 + 8  # 8 bytes past a page boundary
            arr = raw[skip: skip + 3 * sb]
            for i in range(3):
                arr[i * sb: i * sb + fb] = data[i * fb: (i + 1) * fb]
            src = eng.register(arr)
            offs = np.arange(3) * sb
        else:
            src, offs = data.copy(), np.arange(3) * fb
        with counting(eng, "alloc") as n_alloc:
            assert (st.put(keys, None, src, offs) == PUT_STORED).all()
        allocs.append(n_alloc[0])
        stores.append(st)
        if name == "zero-copy":  # the blocks themselves are untouched; the padding took the trailers
            for i in range(3):
                np.testing.assert_array_equal(src.numpy()[i * sb: i * sb + fb], data[i * fb: (i + 1) * fb])
    assert allocs == [0, 1, 1, 1]  # only the first went without a bounce buffer
    for k in keys:
        slots = {slot_bytes_on_disk(tmp_path / n, st, k) for n, st in
                 zip(("zero-copy", "region-packed", "unaligned", "numpy"), stores)}
        assert len(slots) == 1
    for st in stores:
        got = st.get(keys)
        np.testing.assert_array_equal(got.reshape(-1), data)


def test_put_while_another_put_grows_its_segment(open_store, tmp_path: Path, rng) -> None:
    """Between a put's write and its fdatasync, another put (another thread, here nested in
    the first one's write) grows the same segment and then finds the store full: the first
    put still completes."""
    st = open_store(capacity_bytes=3 * 4096, segment_slots=8)
    first, second = st.keys(tokens(rng, 1)), st.keys(tokens(rng, 3))
    real_write = st.engine.write
    nested = []

    def write_then_put(*a, **kw):
        req = real_write(*a, **kw)
        if not nested:
            nested.append(1)
            with pytest.raises(StoreFull):  # grows segment 0 to 3 slots, gets 2, cannot evict
                put_keys(st, second)
        return req

    st.engine.write = write_then_put
    try:
        assert (put_keys(st, first) == PUT_STORED).all()
    finally:
        del st.engine.write
    assert nested and st.contains(first + second).tolist() == [True, False, False, False]
    assert_holds(st, first)
    check_index(tmp_path / "store")


def test_put_from_read_only_buffer(open_store, rng) -> None:
    st = open_store()
    keys = st.keys(tokens(rng, 2))
    data = rand_bytes(rng, 2 * TINY_ODD.full_block_bytes)
    ro = np.frombuffer(data.tobytes(), dtype=np.uint8)
    assert not ro.flags.writeable
    assert (st.put(keys, None, ro, [0, TINY_ODD.full_block_bytes]) == PUT_STORED).all()
    np.testing.assert_array_equal(st.get(keys).reshape(-1), data)
    # a read-only Region is a source too (bounce: the trailer cannot go into its padding)
    keys2 = st.keys(tokens(rng, 1))
    r = st.engine.register(ro)
    assert not r.writable
    assert (st.put(keys2, None, r, [0]) == PUT_STORED).all()
    np.testing.assert_array_equal(st.get(keys2).reshape(-1), data[:TINY_ODD.full_block_bytes])


# --- lookup ----------------------------------------------------------------------------------

def test_lookup_longest_prefix(open_store, rng) -> None:
    st = open_store()
    bt = TINY_ODD.block_tokens
    stored = tokens(rng, 4)
    put_keys(st, st.keys(stored))
    look = st.lookup(stored)
    assert (look.hits, len(look.keys), look.pinned) == (4, 4, False)
    assert look.hit_keys == st.keys(stored) and look.miss_keys == []
    longer = np.concatenate([stored, tokens(rng, 3, extra=2)])  # the stored prompt plus more
    look = st.lookup(longer)
    assert (look.hits, len(look.keys)) == (4, 7)
    assert look.miss_keys == st.keys(longer)[4:]
    shared = np.concatenate([stored[: 2 * bt], tokens(rng, 3)])  # shares two blocks, then diverges
    assert st.lookup(shared).hits == 2
    mid = stored.copy()
    mid[2 * bt + 2] += 1  # diverges in the middle of block 2
    assert st.lookup(mid).hits == 2
    first = stored.copy()
    first[0] += 1
    assert st.lookup(first).hits == 0
    assert st.lookup(tokens(rng, 5)).hits == 0  # nothing cached
    assert st.lookup(stored[: bt - 1]).keys == []  # no full block
    assert st.lookup(keys=st.keys(stored)[:3]).hits == 3
    # block 1 removed (with its subtree): one hit
    keys = st.keys(stored)
    assert st.remove([keys[1]]) == 3
    assert st.lookup(stored).hits == 1
    assert st.contains(keys).tolist() == [True, False, False, False]
    assert st.stats()["pinned"] == 0
    with pytest.raises(ValueError, match="exactly one of tokens or keys"):
        st.lookup()
    with pytest.raises(ValueError, match="exactly one of tokens or keys"):
        st.lookup(stored, keys=keys)


def test_lookup_pin(open_store, tmp_path: Path, rng) -> None:
    st = open_store(capacity_bytes=10 * 4096)
    a, b = tokens(rng, 3), tokens(rng, 2)
    put_keys(st, st.keys(a))
    put_keys(st, st.keys(b))
    look = st.lookup(np.concatenate([a, tokens(rng, 1)]), pin=True)
    assert look.pinned and look.hits == 3
    assert st.pinned(st.keys(a)).all() and not st.pinned(st.keys(b)).any()
    assert st.pinned(look.keys).tolist() == [True, True, True, False]
    assert st.evict(100 * 4096) == 2  # only b's chain goes; the pinned chain cannot
    assert st.contains(st.keys(a)).all() and not st.contains(st.keys(b)).any()
    again = st.lookup(a, pin=True)  # pins are counted
    st.unpin(look.hit_keys)
    assert st.pinned(st.keys(a)).all()
    st.unpin(again.hit_keys)
    assert not st.pinned(st.keys(a)).any()
    st.unpin(again.hit_keys)  # not pinned: ignored
    assert st.evict(4096) == 1 and st.contains(st.keys(a)).tolist() == [True, True, False]
    nothing = st.lookup(tokens(rng, 2), pin=True)
    assert nothing.hits == 0 and st.stats()["pinned"] == 0
    check_index(tmp_path / "store")


# --- eviction --------------------------------------------------------------------------------

def test_eviction_lru_among_leaves(open_store, tmp_path: Path, rng) -> None:
    st = open_store(capacity_bytes=4 * 4096, segment_slots=3)
    prompts = [tokens(rng, 1) for _ in range(6)]
    for p in prompts[:4]:
        assert (put_keys(st, st.keys(p)) == PUT_STORED).all()
    assert st.lookup(prompts[0]).hits == 1  # touch: 0 is now the most recently used
    put_keys(st, st.keys(prompts[4]))       # evicts 1, the least recently used
    assert [st.lookup(p).hits for p in prompts[1:2]] == [0]
    assert st.contains([st.keys(p)[0] for p in prompts]).tolist() == [True, False, True, True, True, False]
    st.get(st.keys(prompts[2]))             # a read touches too: 3 is now the oldest
    put_keys(st, st.keys(prompts[5]))
    assert st.contains([st.keys(p)[0] for p in prompts]).tolist() == [True, False, True, False, True, True]
    assert st.stats()["evictions"] == 2 and st.counters["evictions"] == 2
    ix = check_index(tmp_path / "store")
    assert sum(ix["segments"].values()) == 4  # grew to the capacity, no further


def test_eviction_never_pinned(open_store, rng) -> None:
    st = open_store(capacity_bytes=3 * 4096)
    p = [tokens(rng, 1) for _ in range(5)]
    for t in p[:3]:
        put_keys(st, st.keys(t))
    st.pin(st.keys(p[0]))                   # the oldest, pinned
    put_keys(st, st.keys(p[3]))             # evicts 1, not 0
    assert st.contains([st.keys(t)[0] for t in p[:4]]).tolist() == [True, False, True, True]
    st.pin(st.keys(p[2]) + st.keys(p[3]))
    with pytest.raises(StoreFull, match="0 being written, 3 pinned"):
        put_keys(st, st.keys(p[4]))         # everything pinned: nothing to evict
    assert st.stats()["writing"] == 0 and len(st) == 3  # nothing partial left
    st.unpin(st.keys(p[2]))
    put_keys(st, st.keys(p[4]))
    assert st.contains([st.keys(t)[0] for t in p]).tolist() == [True, False, False, True, True]


def test_eviction_inner_nodes_after_children(open_store, tmp_path: Path, rng) -> None:
    st = open_store(capacity_bytes=4 * 4096)
    chain = st.keys(tokens(rng, 3))
    put_keys(st, chain)                     # oldest: the chain r -> m -> l
    x = st.keys(tokens(rng, 1))
    put_keys(st, x)
    st.lookup(keys=chain)                   # touching the inner nodes does not matter ...
    st.lookup(keys=x)                       # ... x is the newest
    expect = [[True, True, False, True], [True, False, False, True], [False, False, False, True]]
    for want in expect:                     # each new block evicts the chain's current leaf
        put_keys(st, st.keys(tokens(rng, 1)))
        st.lookup(keys=x)
        assert st.contains(chain + x).tolist() == want
        check_index(tmp_path / "store")
    assert st.evict(1) == 1 and st.contains(x)[0]  # the oldest leaf went, not x


def test_put_more_than_capacity(open_store, rng) -> None:
    st = open_store(capacity_bytes=3 * 4096)
    keys = st.keys(tokens(rng, 4))
    with pytest.raises(StoreFull, match="exceeds the capacity of 3 slots"):
        put_keys(st, keys)
    assert len(st) == 0 and st.stats()["writing"] == 0
    assert (put_keys(st, keys[:3]) == PUT_STORED).all()
    # the chain's leaf is the only block to evict, and it is the new block's parent: protected
    with pytest.raises(StoreFull, match="no room for 1 more blocks"):
        put_keys(st, keys)
    assert st.contains(keys).tolist() == [True, True, True, False]
    assert st.stats()["writing"] == 0


def test_capacity_shrink_and_persist_on_reopen(open_store, tmp_path: Path, rng) -> None:
    root = tmp_path / "store"
    st = open_store(capacity_bytes=8 * 4096, segment_slots=3)
    prompts = [tokens(rng, 1) for _ in range(8)]
    for t in prompts:
        put_keys(st, st.keys(t))
    st.close()
    st = open_store()                       # None keeps the recorded capacity
    assert st.capacity_slots == 8 and st.capacity_bytes == 8 * 4096
    st.close()
    st = open_store(capacity_bytes=4 * 4096 + 100)  # shrinks to 4 slots (whole slots only)
    assert st.capacity_slots == 4 and len(st) == 8  # eviction waits for the next put
    for t in prompts[5:]:
        st.lookup(t)                        # 5, 6, 7 most recent
    put_keys(st, st.keys(tokens(rng, 1)))
    assert len(st) == 4
    assert st.contains([st.keys(t)[0] for t in prompts]).tolist() == [False] * 5 + [True] * 3
    check_index(root)
    st.close()
    st = open_store(capacity_bytes=1)       # less than a slot: one slot
    assert st.capacity_slots == 1


def test_remove_leaves_pinned_subtrees(open_store, tmp_path: Path, rng) -> None:
    st = open_store()
    a, b = st.keys(tokens(rng, 3)), st.keys(tokens(rng, 2))
    put_keys(st, a)
    put_keys(st, b)
    st.pin([a[2]])
    assert st.remove([a[0]]) == 0           # its subtree holds a pinned block
    assert st.contains(a).all()
    assert st.remove([b[1], b[0], b"\x05" * 16]) == 2
    st.unpin([a[2]])
    assert st.remove([a[1]]) == 2
    assert st.contains(a + b).tolist() == [True] + [False] * 4
    check_index(tmp_path / "store")


# --- a live writer's reservations, and a dead one's -----------------------------------------

def test_writing_blocks_of_another_process(open_store, tmp_path: Path, rng) -> None:
    """A child pins blocks and reserves others, then blocks in the middle of its put (its rows
    are WRITING, its pins held). Eviction never takes them, a put of the same key is
    PUT_EXISTS, a child of such a block PUT_NO_PARENT; once the child is killed, its
    reservations and pins are reaped when this store runs out of room, and the keys can be put."""
    root = tmp_path / "store"
    st = open_store(capacity_bytes=5 * 4096)
    pinned = st.keys(tokens(rng, 2))
    put_keys(st, pinned)
    writing = st.keys(tokens(rng, 2))
    args = {"spec": [TINY_ODD.name, 3, 100, 5], "keys": [k.hex() for k in writing], "pin": [k.hex() for k in pinned]}
    with hung_writer(root, args) as owner:
        ix = check_index(root)
        assert sorted(k for k, b in ix["blocks"].items() if b["state"] == 0) == sorted(writing)
        assert {o for _k, o, _c in ix["pins"]} == {owner}
        s = st.stats()
        assert (s["writing"], s["pinned"], s["blocks"]) == (2, 2, 2)
        assert not st.contains(writing).any()          # never served
        assert st.lookup(keys=writing).hits == 0
        with pytest.raises(BlockMissing):
            st.get(writing[:1])
        kid = st.keys(tokens(rng, 1), parent=writing[1])
        out = put_keys(st, writing + kid)              # being written elsewhere: not ours to write
        np.testing.assert_array_equal(out, [PUT_EXISTS, PUT_EXISTS, PUT_NO_PARENT])
        assert st.evict(10 * 4096) == 0                # pinned and WRITING rows are never evicted
        other = st.keys(tokens(rng, 1))
        put_keys(st, other)                            # the fifth slot
        st.pin(other)
        with pytest.raises(StoreFull, match="2 being written, 3 pinned"):
            put_keys(st, st.keys(tokens(rng, 1)))      # the child is alive: nothing to reap
        assert st.reap() == 0
    # This store has been open all along: the full store reaps the dead child's rows itself.
    fresh = st.keys(tokens(rng, 2))
    assert (put_keys(st, fresh) == PUT_STORED).all()
    assert st.counters["reaped"] == 4  # 2 reservations, 2 pins
    st.unpin(other)
    ix = check_index(root)
    assert all(b["state"] == 1 and b["owner"] is None for b in ix["blocks"].values()) and ix["pins"] == []
    assert_holds(st, pinned + fresh)
    # a key a dead writer had reserved is written again by the next put of it
    assert (put_keys(st, writing) == PUT_STORED).all()
    assert_holds(st, writing)


def test_dead_writer_reaped_at_open(open_store, tmp_path: Path, rng) -> None:
    root = tmp_path / "store"
    st = open_store()
    pinned = st.keys(tokens(rng, 1))
    put_keys(st, pinned)
    writing = st.keys(tokens(rng, 3))
    args = {"spec": [TINY_ODD.name, 3, 100, 5], "keys": [k.hex() for k in writing], "pin": [pinned[0].hex()]}
    with hung_writer(root, args):
        pass
    st.close()
    ix = index_rows(root)
    assert len(ix["pins"]) == 1 and sum(b["state"] == 0 for b in ix["blocks"].values()) == 3
    st = open_store()
    assert st.counters["reaped"] == 4
    ix = check_index(root)
    assert ix["pins"] == [] and list(ix["blocks"]) == pinned
    # and a live foreign owner is reaped only when named (owners on other hosts are never presumed dead)
    with st._txn() as db:
        db.execute("INSERT INTO pins(key, owner, count) VALUES(?, 'otherhost:1:1', 2)", (pinned[0],))
    assert st.reap() == 0 and st.pinned(pinned)[0]
    assert st.reap("otherhost:1:1") == 1 and not st.pinned(pinned)[0]


def test_corrupt_parent_dooms_a_child_being_written(open_store, tmp_path: Path, rng) -> None:
    """A block found corrupt is dropped with its subtree; a child another process is writing at
    that moment is marked DOOMED, not freed: its slot stays reserved (the write may still land
    there) until that writer ends or is reaped, and it is never served."""
    root = tmp_path / "store"
    st = open_store()
    parent = st.keys(tokens(rng, 1))
    put_keys(st, parent)
    child = st.keys(tokens(rng, 1), parent=parent[0])
    args = {"spec": [TINY_ODD.name, 3, 100, 5], "keys": [k.hex() for k in child], "parent": parent[0].hex()}
    with hung_writer(root, args):
        seg, slot = seg_path(root, parent[0])
        flip(seg, slot * st.slot_bytes + 10)
        with pytest.raises(BlockCorrupt):
            st.get(parent)
        ix = check_index(root)
        assert parent[0] not in ix["blocks"]
        doomed = ix["blocks"][child[0]]
        assert doomed["state"] == 2
        assert (doomed["seg"], doomed["slot"]) not in ix["free"]  # still the writer's
        assert not st.contains(child).any() and st.lookup(keys=parent + child).hits == 0
        assert st.reap() == 0  # the writer is alive
    assert st.reap() == 1      # dead now: the DOOMED reservation is released
    ix = check_index(root)
    assert child[0] not in ix["blocks"] and (doomed["seg"], doomed["slot"]) in ix["free"]


def test_doomed_child_released_after_its_parent_is_put_again(open_store, tmp_path: Path, rng) -> None:
    """Parent K corrupt and dropped while child C is being written (C DOOMED; in-process: another
    store object drops K while this one's engine write runs), then K put again. C's writer finds
    out at its commit: the put raises, C is absent, its slot free again, and releasing it does
    not lower the new K's child count (it would go to -1: K never evictable, later an inner node
    evicted under its child)."""
    root = tmp_path / "store"
    a, b = open_store(), open_store()
    k = a.keys(tokens(rng, 1))
    put_keys(a, k)
    c = a.keys(tokens(rng, 1), parent=k[0])
    real = a._engine.write

    def corrupt_drop_and_put_parent_again(*args, **kw):
        del a._engine.write  # once (the stores may share an engine: b's put below writes too)
        seg, slot = seg_path(root, k[0])
        flip(seg, slot * b.slot_bytes + 10)
        with pytest.raises(BlockCorrupt):
            b.get(k)
        put_keys(b, k)
        return real(*args, **kw)

    a._engine.write = corrupt_drop_and_put_parent_again
    with pytest.raises(StoreError, match="dropped while being written"):
        put_keys(a, c, parent=k[0])
    ix = check_index(root)  # child counts match
    assert ix["blocks"][k[0]]["children"] == 0 and c[0] not in ix["blocks"]
    assert (put_keys(a, c, parent=k[0]) == PUT_STORED).all()
    assert check_index(root)["blocks"][k[0]]["children"] == 1


def test_read_whose_release_fails_never_passes_later(open_store, tmp_path: Path, rng) -> None:
    """If releasing a read's pins fails (the index cannot be written), result() raises, and
    raises again when retried: it never turns into success over unverified bytes."""
    root = tmp_path / "store"
    st = open_store()
    k = st.keys(tokens(rng, 1))
    put_keys(st, k)
    seg, slot = seg_path(root, k[0])
    flip(seg, slot * st.slot_bytes + 10)
    real = st._release_read

    def fails_once(*a, **kw):
        st._release_read = real
        raise StoreError("the index: database is locked")

    st._release_read = fails_once
    buf = st.engine.alloc(st.slot_bytes)
    r = st.read(k, buf, [0])
    for _ in range(2):
        with pytest.raises(StoreError, match="database is locked"):
            r.result()


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    ({"capacity_bytes": 0}, ValueError, "capacity_bytes must be a positive int"),
    ({"capacity_bytes": -4096}, ValueError, "capacity_bytes must be a positive int"),
    ({"capacity_bytes": 4096.0}, ValueError, "capacity_bytes must be a positive int"),
    ({"capacity_bytes": "1G"}, ValueError, "capacity_bytes must be a positive int"),
    ({"segment_slots": 0}, ValueError, "segment_slots must be a positive int"),
    ({"segment_slots": -1}, ValueError, "segment_slots must be a positive int"),
    ({"segment_slots": 1.5}, ValueError, "segment_slots must be a positive int"),
])
def test_bad_store_arguments(tmp_path: Path, kwargs: dict, exc, match: str) -> None:
    with pytest.raises(exc, match=match):
        BlockStore(tmp_path / "s", TINY, **kwargs)
    assert not (tmp_path / "s").exists()


def test_bad_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        BlockStore(tmp_path / "s", get_model("nope"))
    with pytest.raises(TypeError, match="spec must be a dpmove.kv.ModelSpec"):
        BlockStore(tmp_path / "s", "tiny")


def test_bad_keys(open_store, rng) -> None:
    st = open_store()
    keys = st.keys(tokens(rng, 2))
    put_keys(st, keys)
    buf = np.zeros(2 * 4096, dtype=np.uint8)
    bad_lists = [[keys[0], b"x" * 15], [keys[0], "k" * 16], [keys[0], 7], [keys[0], None], keys[0]]
    for bad in bad_lists:
        offs = [0, 4096][: len(bad)]
        for name, call in (("put", lambda b, offs=offs: st.put(b, None, buf, offs)), ("contains", st.contains),
                           ("pin", st.pin), ("unpin", st.unpin), ("pinned", st.pinned), ("remove", st.remove),
                           ("get", st.get), ("read", lambda b, offs=offs: st.read(b, buf, offs)),
                           ("lookup", lambda b: st.lookup(keys=b))):
            with pytest.raises(TypeError, match="16 bytes|16-byte keys"):
                call(bad)
                pytest.fail(f"{name} took {bad!r}")
    with pytest.raises(TypeError, match="parent must be 16 bytes"):
        st.put(keys, b"short", buf, [0, 4096])
    with pytest.raises(TypeError, match="parent"):
        st.put(keys, [ROOT, 5], buf, [0, 4096])
    # keys as bytearray / memoryview are accepted
    assert st.contains([bytearray(keys[0]), memoryview(keys[1])]).all()
    s = st.stats()
    assert (s["pinned"], s["writing"], s["blocks"]) == (0, 0, 2)
    assert_holds(st, keys)


def test_bad_offsets_and_regions(open_store, make_engine, rng) -> None:
    st = open_store()
    keys = st.keys(tokens(rng, 2))
    fb, sb = TINY_ODD.full_block_bytes, st.slot_bytes
    data = rand_bytes(rng, 2 * fb)
    cases = [
        (lambda: st.put(keys, None, data, [0]), ValueError, "2 keys but 1 offsets"),
        (lambda: st.put(keys, None, data, [0, fb, 2 * fb]), ValueError, "2 keys but 3 offsets"),
        (lambda: st.put(keys, None, data, [0, fb + 1]), ValueError, "outside the 3000-byte region"),
        (lambda: st.put(keys, None, data, [-1, fb]), ValueError, "outside"),
        (lambda: st.put(keys, None, data[: fb + 10], [0, fb]), ValueError, "outside"),
        (lambda: st.put(keys, None, object(), [0, fb]), TypeError, "expected a dpmove Region or a buffer"),
        (lambda: st.put(keys, None, data.reshape(2, fb)[:, ::2], [0, 1]), ValueError, "C-contiguous"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    assert len(st) == 0 and st.stats()["writing"] == 0
    put_keys(st, keys)
    region = st.engine.alloc(2 * sb)
    cases = [
        (lambda: st.read(keys, region, [0]), ValueError, "2 keys but 1 region offsets"),
        (lambda: st.read(keys, region, [0, sb + 1]), ValueError, "outside the 8192-byte region"),
        (lambda: st.read(keys, region, [-sb, 0]), ValueError, "outside"),
        (lambda: st.read(keys, region, [0, sb // 2]), ValueError, "at least slot_bytes"),
        (lambda: st.read(keys, region, [0, 0]), ValueError, "at least slot_bytes"),
        (lambda: st.read(keys[:1], st.engine.alloc(fb), [0]), ValueError, "outside the 1500-byte region"),
        (lambda: st.read(keys[:1], bytes(sb), [0]), ValueError, "read-only"),
        (lambda: st.read(keys[:1], st.engine.register(np.frombuffer(bytes(sb), np.uint8)), [0]), ValueError,
         "read-only"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    # an unaligned host buffer cannot take an O_DIRECT read: refused before anything runs
    if st._file(0).direct:
        raw = np.zeros(sb + 4096 + 8, dtype=np.uint8)
        skip = (-raw.ctypes.data) % 4096 + 8
        with pytest.raises(ValueError, match="O_DIRECT needs the memory address"):
            st.read(keys[:1], raw[skip: skip + sb], [0])
    # device memory (the emulated GPU where there is none)
    dev_eng = make_engine(gpu="emulated")
    dev = dev_eng.device_alloc(2 * sb)
    assert dev.location != "host"
    with pytest.raises(ValueError, match="device region"):
        st.read(keys, dev, [0, sb])
    with pytest.raises(ValueError, match="device region"):
        st.put(st.keys(tokens(rng, 1)), None, dev, [0])
    s = st.stats()
    assert (s["pinned"], s["writing"], s["blocks"]) == (0, 0, 2)
    assert_holds(st, keys)


def test_geometry_mismatch_on_reopen(open_store, tmp_path: Path, rng) -> None:
    st = open_store()
    put_keys(st, st.keys(tokens(rng, 1)))
    st.close()
    for other in (TINY, TINY_ODD.with_block_tokens(6), ModelSpec("tiny-odd", 3, 101, 5), ModelSpec("odd", 3, 100, 5)):
        with pytest.raises(ValueError, match="open it with the same model geometry"):
            BlockStore(tmp_path / "store", other)
    assert len(open_store()) == 1


@pytest.mark.parametrize("content,match", [
    (b"\x00garbage{", "is not a dpmove store description"),
    (b"", "is not a dpmove store description"),
    (b"[1, 2]", "is not a dpmove store description"),
    (b'{"format": 1}', "is not a dpmove store description"),
    ("format2", "holds a store of format 2"),
    ("slot", "slot_bytes 8192 differs"),
])
def test_garbage_meta(open_store, tmp_path: Path, rng, content, match: str) -> None:
    st = open_store()
    put_keys(st, st.keys(tokens(rng, 1)))
    st.close()
    meta_path = tmp_path / "store" / "dpmove-store.json"
    if isinstance(content, str):
        meta = json.loads(meta_path.read_text())
        meta.update({"format": 2} if content == "format2" else {"slot_bytes": 8192})
        content = json.dumps(meta).encode()
    meta_path.write_bytes(content)
    with pytest.raises(StoreError, match=match):
        BlockStore(tmp_path / "store", TINY_ODD)


def test_read_only_directory(tmp_path: Path, rng) -> None:
    """A directory this process cannot write: chmod 0555 for a user; as root (where chmod does
    not stop writes) a read-only bind mount of an existing store and an empty read-only tmpfs."""
    root = tmp_path / "store"
    with BlockStore(root, TINY_ODD) as st:
        keys = st.keys(tokens(rng, 2))
        put_keys(st, keys)
    if not is_root():
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        try:
            with pytest.raises(StoreError) as info:
                BlockStore(d / "store", TINY_ODD)
            assert info.value.errno == errno.EACCES
            root.chmod(0o555)
            with pytest.raises(StoreError, match="is not writable"):
                BlockStore(root, TINY_ODD)
        finally:
            d.chmod(0o755)
            root.chmod(0o755)
        with BlockStore(root, TINY_ODD) as st:
            assert_holds(st, keys)
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(root), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        with pytest.raises(OSError):
            (ro / "probe").write_bytes(b"x")
        with pytest.raises(StoreError, match="is not writable") as info:
            BlockStore(ro, TINY_ODD)
        assert info.value.errno == errno.EACCES
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    with mounted("tmpfs", "ro,size=1m") as where:
        with pytest.raises(StoreError, match="cannot create the store directory") as info:
            BlockStore(where / "store", TINY_ODD)
        assert info.value.errno == errno.EROFS
    with BlockStore(root, TINY_ODD) as st:  # the store itself is unharmed
        assert_holds(st, keys)


@pytest.mark.root
@pytest.mark.timeout(120, method="thread")
def test_full_directory(rng) -> None:
    """The store fills a size-limited tmpfs (its capacity is larger): put raises StoreFull (or
    a StoreError for ENOSPC), the blocks the index holds stay readable (lookups and reads need
    no room), and once the filesystem has room again the store goes on, with nothing of the
    failed put left behind."""
    spec = ModelSpec("fs", 2, 1000, 8)  # Full Block 16,000 B, slot 16 KiB
    with mounted("tmpfs", "size=1m") as where:
        root = where / "store"
        stored: list = []
        with BlockStore(root, spec, capacity_bytes=256 * 16384, segment_slots=4) as st:
            for _ in range(200):
                keys = st.keys(tokens(rng, 2, spec))
                try:
                    put_keys(st, keys)
                except StoreError as e:
                    assert isinstance(e, StoreFull) or e.errno == errno.ENOSPC, repr(e)
                    break
                stored.append(keys)
            else:
                pytest.fail("a 1 MiB tmpfs held 400 blocks of 16 KiB")
            held = [k for c in stored for k in c if st.contains([k])[0]]
            assert len(held) >= 8
            assert all(st.lookup(keys=c).hits == sum(k in held for k in c) for c in stored)
            assert_holds(st, held)
            assert st.verify() == []
            with pytest.raises(StoreError):
                put_keys(st, st.keys(tokens(rng, 1, spec)))  # still full
            subprocess.run(["mount", "-o", "remount,size=4m", str(where)], check=True)
            more = st.keys(tokens(rng, 2, spec))
            assert (put_keys(st, more) == PUT_STORED).all()
            assert_holds(st, [k for k in held if st.contains([k])[0]] + more)
            ix = check_index(root)
            assert all(b["state"] == 1 for b in ix["blocks"].values()), "a failed put left a reservation behind"
        with BlockStore(root, spec) as st:
            assert_holds(st, [k for k in held + more if st.contains([k])[0]])


@pytest.mark.root
@pytest.mark.timeout(120, method="thread")
def test_full_filesystem_at_open_keeps_the_index(rng) -> None:
    """Opening a store on a filesystem with no free block must fail (or work) without taking
    its intact index for a corrupt one: it is neither moved aside nor rebuilt."""
    with mounted("tmpfs", "size=1m") as where:
        root = where / "store"
        with BlockStore(root, TINY_ODD) as st:
            keys = st.keys(tokens(rng, 3))
            put_keys(st, keys)
        fill_filesystem(where)
        try:
            st = BlockStore(root, TINY_ODD)
        except StoreError as e:
            assert "corrupt" not in str(e), e
        else:
            assert st.recovered is None
            assert_holds(st, keys)
            st.close()
        assert sorted(os.listdir(root))[:2] == ["dpmove-store.json", "index.sqlite"]
        assert not [n for n in os.listdir(root) if "corrupt" in n]
        os.unlink(where / "filler")
        with BlockStore(root, TINY_ODD) as st:
            assert st.recovered is None
            assert_holds(st, keys)


# --- corruption ------------------------------------------------------------------------------

def test_corrupt_block_dropped_with_descendants(open_store, tmp_path: Path, rng) -> None:
    root = tmp_path / "store"
    st = open_store(spec=MULTI)
    chain = st.keys(tokens(rng, 4, MULTI))
    other = st.keys(tokens(rng, 2, MULTI))
    put_keys(st, chain)
    put_keys(st, other)
    path, slot = seg_path(root, chain[1])
    freed = {(index_rows(root)["blocks"][k]["seg"], index_rows(root)["blocks"][k]["slot"]) for k in chain[1:]}
    flip(path, slot * st.slot_bytes + 12_345)  # one byte in the middle of block 1's data
    with pytest.raises(BlockCorrupt, match=chain[1].hex()) as info:
        st.get(chain)
    assert info.value.keys == [chain[1]]
    assert info.value.ok.tolist() == [True, False, True, True]  # the others verified
    assert st.contains(chain + other).tolist() == [True, False, False, False, True, True]
    assert st.counters["corrupt"] == 1
    assert st.lookup(keys=chain).hits == 1
    assert_holds(st, chain[:1] + other)
    ix = check_index(root)
    assert freed <= set(ix["free"])
    # the slot is reused and the chain stored again
    assert (put_keys(st, chain) == [PUT_EXISTS] + [PUT_STORED] * 3).all()
    assert_holds(st, chain)
    assert st.verify() == []


@pytest.mark.parametrize("where", ["trailer-sum", "trailer-key", "padding", "data-first", "data-last"])
def test_corrupt_byte_positions(open_store, tmp_path: Path, rng, where: str) -> None:
    root = tmp_path / "store"
    st = open_store(spec=MULTI)
    keys = st.keys(tokens(rng, 2, MULTI))
    put_keys(st, keys)
    fb = MULTI.full_block_bytes
    path, slot = seg_path(root, keys[1])
    off = {"trailer-sum": fb + 60, "trailer-key": fb + 9, "padding": fb + 100, "data-first": 0, "data-last": fb - 1}[where]
    flip(path, slot * st.slot_bytes + off)
    if where == "padding":  # outside data and trailer: nothing to detect, nothing lost
        assert_holds(st, keys)
        return
    with pytest.raises(BlockCorrupt, match=keys[1].hex()):
        st.get(keys)
    assert st.contains(keys).tolist() == [True, False]


@pytest.mark.parametrize("cut", ["slot-boundary", "mid-slot", "empty"])
def test_truncated_segment(open_store, tmp_path: Path, rng, cut: str) -> None:
    root = tmp_path / "store"
    st = open_store(spec=MULTI, segment_slots=4)
    keys = st.keys(tokens(rng, 6, MULTI))  # segment 0: blocks 0-3, segment 1: blocks 4-5
    put_keys(st, keys)
    first = [k for k in keys if index_rows(root)["blocks"][k]["seg"] == 0]
    assert len(first) == 4
    slots = sorted(index_rows(root)["blocks"][k]["slot"] for k in first)
    size = {"slot-boundary": 2 * st.slot_bytes, "mid-slot": 2 * st.slot_bytes + 5000, "empty": 0}[cut]
    os.truncate(root / "segments" / "seg-000000", size)
    lost = [k for k in first if index_rows(root)["blocks"][k]["slot"] >= size // st.slot_bytes]
    assert slots == [0, 1, 2, 3] and lost
    with pytest.raises(BlockCorrupt) as info:
        st.get(keys)
    assert set(info.value.keys) == set(lost)
    gone = keys[keys.index(lost[0]):]  # the first lost block and everything after it in the chain
    assert st.contains(keys).tolist() == [k not in gone for k in keys]
    assert_holds(st, [k for k in keys if k not in gone])
    check_index(root)
    # the chain is stored again (into slots past the end of the cut file: the file grows back)
    put_keys(st, keys)
    assert_holds(st, keys)
    assert st.verify() == []


@pytest.mark.parametrize("damage", ["garbage", "half", "header-only", "empty", "deleted"])
def test_corrupt_index_rebuilt_from_segments(open_store, tmp_path: Path, rng, damage: str) -> None:
    root = tmp_path / "store"
    st = open_store(spec=MULTI, capacity_bytes=40 * MULTI.full_block_bytes, segment_slots=4)
    a, b = st.keys(tokens(rng, 5, MULTI)), st.keys(tokens(rng, 2, MULTI))
    put_keys(st, a)
    put_keys(st, b)
    st.remove([b[1]])          # an evicted block's slot still holds its (valid) trailer
    before = index_rows(root)
    st.close()
    index = root / "index.sqlite"
    assert not (root / "index.sqlite-wal").exists()
    size = index.stat().st_size
    if damage == "garbage":
        index.write_bytes(rand_bytes(rng, size).tobytes())
    elif damage == "half":
        os.truncate(index, size // 2)
    elif damage == "header-only":
        os.truncate(index, 100)
    elif damage == "empty":
        os.truncate(index, 0)
    else:
        index.unlink()
    with pytest.warns(RuntimeWarning, match="rebuilt from .*segment"):
        st = open_store(spec=MULTI)
    assert st.recovered and "blocks" in st.recovered
    aside = [n for n in os.listdir(root) if ".corrupt." in n and not n.endswith(("-wal", "-shm"))]
    assert len(aside) == (1 if damage in ("garbage", "half", "header-only") else 0)
    ix = check_index(root)
    # every block comes back at its slot with its checksum, and the removed one too (its
    # slot still held it, with a valid trailer, and its parent is there)
    assert b[1] not in before["blocks"]
    for k, was in before["blocks"].items():
        assert {c: ix["blocks"][k][c] for c in ("seg", "slot", "checksum", "parent", "children")} == {
            c: was[c] for c in ("seg", "slot", "checksum", "parent", "children")} or k == b[0]
    assert ix["blocks"][b[0]]["children"] == 1
    assert st.contains(a + b).all()
    assert_holds(st, a + b)
    assert st.verify() == []
    assert ix["segments"] == before["segments"]
    # and the store goes on: new blocks, and a reopen without any warning
    c = st.keys(tokens(rng, 2, MULTI))
    put_keys(st, c)
    st.close()
    st = open_store(spec=MULTI)
    assert st.recovered is None
    assert_holds(st, a + b + c)


def test_rebuild_keeps_prefix_closed(open_store, tmp_path: Path, rng) -> None:
    """A block whose parent's slot no longer holds the parent is not brought back."""
    root = tmp_path / "store"
    st = open_store(spec=MULTI)
    keys = st.keys(tokens(rng, 3, MULTI))
    put_keys(st, keys)
    path, slot = seg_path(root, keys[1])
    st.close()
    flip(path, slot * st.slot_bytes + MULTI.full_block_bytes + 20)  # block 1's trailer: invalid
    (root / "index.sqlite").write_bytes(b"not an index at all" * 100)
    with pytest.warns(RuntimeWarning, match="rebuilt from 1 segments: 1 blocks"):
        st = open_store(spec=MULTI)
    assert st.contains(keys).tolist() == [True, False, False]
    ix = check_index(root)
    assert len(ix["free"]) == sum(ix["segments"].values()) - 1


def test_torn_and_stale_writes(open_store, tmp_path: Path, rng) -> None:
    """What a power cut can leave in a slot, written directly: half of new data over a READY
    block, a block whose trailer is a stale one (another block's), a slot still holding its
    previous occupant. Each reads as BlockCorrupt; the other blocks stay usable."""
    root = tmp_path / "store"
    spec = ModelSpec("torn", 4, 3000, 8)  # Full Block 96,000 B over 24 pages
    st = open_store(spec=spec)
    fb, sb = spec.full_block_bytes, st.slot_bytes
    chains = [st.keys(tokens(rng, 2, spec)) for _ in range(4)]
    for c in chains:
        put_keys(st, c)
    victims = [c[1] for c in chains[:3]]

    def at(key: bytes) -> tuple:
        path, slot = seg_path(root, key)
        return path, slot * sb

    assert len({at(k)[0] for k in victims + chains[3]}) == 1  # one segment file
    with open(at(victims[0])[0], "r+b") as f:
        _path, base = at(victims[0])
        os.pwrite(f.fileno(), rand_bytes(rng, fb // 2).tobytes(), base)           # torn: half new data
        _path, base = at(victims[1])
        _path, donor = at(chains[3][1])
        os.pwrite(f.fileno(), os.pread(f.fileno(), 64, donor + fb), base + fb)  # stale trailer
        _path, base = at(victims[2])
        os.pwrite(f.fileno(), os.pread(f.fileno(), sb, donor), base)             # stale whole slot
    for v in victims:
        with pytest.raises(BlockCorrupt, match=v.hex()):
            st.get([v])
    assert not st.contains(victims).any()
    assert st.contains([c[0] for c in chains] + chains[3]).all()
    assert_holds(st, [c[0] for c in chains] + chains[3])
    assert st.verify() == []
    check_index(root)


def test_verify_finds_exactly_the_corrupt_blocks(open_store, tmp_path: Path, rng) -> None:
    root = tmp_path / "store"
    st = open_store(spec=MULTI, segment_slots=8)
    chains = [st.keys(tokens(rng, int(rng.integers(1, 4)), MULTI)) for _ in range(12)]
    for c in chains:
        put_keys(st, c)
    allk = [k for c in chains for k in c]
    # one block in each of five chains, at random depths (no two related)
    pick = rng.choice(len(chains), 5, replace=False)
    bad = [chains[i][int(rng.integers(len(chains[i])))] for i in pick]
    for k in bad:
        path, slot = seg_path(root, k)
        flip(path, slot * st.slot_bytes + int(rng.integers(MULTI.full_block_bytes + 64)))
    assert sorted(st.verify(batch=4)) == sorted(bad)
    dropped = set()
    for i in pick:
        c = chains[i]
        dropped.update(c[c.index(next(k for k in c if k in bad)):])
    assert st.contains(allk).tolist() == [k not in dropped for k in allk]
    assert st.verify() == []
    assert_holds(st, [k for k in allk if k not in dropped])
    check_index(root)


def test_closed_store(open_store, rng) -> None:
    st = open_store()
    keys = st.keys(tokens(rng, 1))
    put_keys(st, keys)
    st.close()
    st.close()  # idempotent
    assert st.closed
    for call in (lambda: st.contains(keys), lambda: put_keys(st, keys), lambda: st.get(keys), lambda: len(st),
                 lambda: st.lookup(keys=keys)):
        with pytest.raises(StoreError, match="closed"):
            call()


def test_two_stores_one_process_share_pins(open_store, tmp_path: Path, rng) -> None:
    """Two BlockStore objects on one directory (one process): both see every block at once."""
    a = open_store()
    b = open_store()
    keys = a.keys(tokens(rng, 2))
    put_keys(a, keys)
    assert b.contains(keys).all()
    assert_holds(b, keys)
    assert (put_keys(b, keys) == PUT_EXISTS).all()
    b.pin(keys[1:])
    assert a.pinned(keys).tolist() == [False, True]  # pinned() sees every owner's pins
    a.unpin(keys[1:])  # each store object owns its pins: a cannot drop b's ...
    assert b.pinned(keys).tolist() == [False, True]
    a.close()  # ... nor does closing a
    assert b.pinned(keys).tolist() == [False, True]
    b.unpin(keys[1:])
    assert not b.pinned(keys).any()
