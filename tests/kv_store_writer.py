"""Child-process side of the block store's crash and multi-process tests (not a test module).

Run as ``python kv_store_writer.py MODE STORE_DIR JSON_ARGS``. The geometry is
``ModelSpec(*args["spec"])``; the bytes of the block with key K are ``block_bytes(K, n)``, so any
process can recompute what a block must hold. Modes:

- ``crash``: puts random prompts (chains of 1-4 blocks, often extending a cached prefix) for ever,
  and reads back pinned hits, into a store small enough that slots are evicted and reused.
  Prints ``ready <owner>`` once the first put is durable; the parent SIGKILLs it at a random
  moment. Exits 3 if a read verifies but holds other bytes than expected.
- ``hang``: pins ``args["pin"]`` (hex keys), reserves the chain ``args["keys"]`` with a put that
  never writes (its engine write blocks for ever), prints ``reserved <owner>`` and waits to be
  killed: a live writer with WRITING rows and pins.
- ``writer``: puts ``args["prompts"]`` (token lists) in ``args["seed"]``'s random order, one put
  per prompt, chained from ROOT. Exits 4 if an outcome is not STORED / EXISTS, or is NO_PARENT
  where the parent was not being written by the other writer (its EXISTS in the same call).
- ``reader``: until ``args["stop"]`` exists, looks up a random prompt with pin=True, reads the
  hits and checks their bytes; exits 3 on a mismatch.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def block_bytes(key: bytes, nbytes: int) -> np.ndarray:
    """The content of the block whose key is `key`: random bytes seeded from the key."""
    return np.random.default_rng(int.from_bytes(key, "little")).integers(0, 256, nbytes, dtype=np.uint8)


def fill(keys: list, nbytes: int, stride: int) -> np.ndarray:
    """A buffer holding block_bytes of each key at i * stride."""
    buf = np.zeros(max(1, len(keys)) * stride, dtype=np.uint8)
    for i, k in enumerate(keys):
        buf[i * stride: i * stride + nbytes] = block_bytes(k, nbytes)
    return buf


def _check_read(store, keys: list, region, view: np.ndarray) -> None:
    from dpmove.kv.store import BlockCorrupt

    fb, sb = store.spec.full_block_bytes, store.slot_bytes
    try:
        store.read(keys, region, np.arange(len(keys)) * sb).result()
        ok = np.ones(len(keys), dtype=bool)
    except BlockCorrupt as e:  # detected: allowed
        ok = e.ok
    for i, k in enumerate(keys):
        if ok[i] and not np.array_equal(view[i * sb: i * sb + fb], block_bytes(k, fb)):
            print(f"MISMATCH {k.hex()}", flush=True)
            sys.exit(3)


def crash(store, args: dict) -> None:
    from dpmove.kv.store import StoreFull

    rng = np.random.default_rng(args["seed"])
    spec = store.spec
    fb, sb, bt = spec.full_block_bytes, store.slot_bytes, spec.block_tokens
    region = store.engine.alloc(4 * sb)
    view = region.numpy()
    prompts: list = []
    first = True
    while True:
        if prompts and rng.random() < 0.5:  # extend a prefix (at most 3 blocks) of an earlier prompt
            base = prompts[int(rng.integers(len(prompts)))]
            base = base[: bt * int(rng.integers(1, min(3, len(base) // bt) + 1))]
        else:
            base = np.zeros(0, dtype=np.int64)
        toks = np.concatenate([base, rng.integers(0, 50_000, bt * int(rng.integers(1, 4)))])
        keys = store.keys(toks)
        look = store.lookup(keys=keys, pin=True)
        try:
            if look.hits:
                hit = look.hit_keys[-4:]
                _check_read(store, hit, region, view)
            new = look.miss_keys[:4]
            if new:
                parent = look.hit_keys[-1] if look.hits else None
                buf = fill(new, fb, sb)
                try:
                    store.put(new, parent, buf, np.arange(len(new)) * sb)
                except StoreFull:
                    pass  # everything pinned or in flight at the moment: fine
        finally:
            store.unpin(look.hit_keys)
        prompts.append(toks)
        if len(prompts) > 32:
            prompts.pop(0)
        if first:
            print(f"ready {store.owner}", flush=True)
            first = False


def hang(store, args: dict) -> None:
    keys = [bytes.fromhex(k) for k in args["keys"]]
    pins = [bytes.fromhex(k) for k in args.get("pin", [])]
    if pins:
        assert store.pin(pins).all()

    def blocked_write(*a, **kw):
        print(f"reserved {store.owner}", flush=True)
        time.sleep(3600)
        raise AssertionError("not killed")

    store._engine.write = blocked_write  # step 2 of put: the rows are WRITING now
    fb, sb = store.spec.full_block_bytes, store.slot_bytes
    parent = bytes.fromhex(args["parent"]) if args.get("parent") else None
    store.put(keys, parent, fill(keys, fb, sb), np.arange(len(keys)) * sb)


def writer(store, args: dict) -> None:
    from dpmove.kv.store import PUT_EXISTS, PUT_NO_PARENT, PUT_STORED

    fb, sb = store.spec.full_block_bytes, store.slot_bytes
    prompts = args["prompts"]
    order = np.random.default_rng(args["seed"]).permutation(len(prompts))
    counts = {PUT_STORED: 0, PUT_EXISTS: 0, PUT_NO_PARENT: 0}
    for p in order:
        keys = store.keys(np.array(prompts[p], dtype=np.int64))
        out = store.put(keys, None, fill(keys, fb, sb), np.arange(len(keys)) * sb)
        for i, o in enumerate(out):
            counts[int(o)] += 1
            if o == PUT_NO_PARENT and (i == 0 or out[i - 1] == PUT_STORED):
                print(f"BAD outcome {list(out)} for prompt {p}", flush=True)
                sys.exit(4)
            if o not in (PUT_STORED, PUT_EXISTS, PUT_NO_PARENT):
                print(f"BAD outcome {list(out)} for prompt {p}", flush=True)
                sys.exit(4)
    print(f"done {counts}", flush=True)


def reader(store, args: dict) -> None:
    prompts = args["prompts"]
    rng = np.random.default_rng(args["seed"])
    sb = store.slot_bytes
    n = max(len(p) for p in prompts) // store.spec.block_tokens
    region = store.engine.alloc(max(1, n) * sb)
    view = region.numpy()
    reads = 0
    while not os.path.exists(args["stop"]):
        toks = np.array(prompts[int(rng.integers(len(prompts)))], dtype=np.int64)
        look = store.lookup(toks, pin=True)
        try:
            if look.hits:
                _check_read(store, look.hit_keys, region, view)
                reads += look.hits
        finally:
            store.unpin(look.hit_keys)
    print(f"done {reads}", flush=True)


def main() -> None:
    mode, root, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    args = json.loads(raw)
    from dpmove.kv.model import ModelSpec
    from dpmove.kv.store import BlockStore

    spec = ModelSpec(*args["spec"])
    engine = None
    if args.get("backend"):
        import dpmove

        engine = dpmove.Engine(args["backend"])
    store = BlockStore(root, spec, capacity_bytes=args.get("capacity"), segment_slots=args.get("segment_slots"),
                       engine=engine)
    {"crash": crash, "hang": hang, "writer": writer, "reader": reader}[mode](store, args)
    store.close()
    if engine is not None:
        engine.close()


if __name__ == "__main__":
    main()


# --- helpers for the parent side (tests) -------------------------------------------------------

def index_rows(root) -> dict:
    """The index as it is on disk, through a separate read-only SQLite connection: blocks
    (key -> dict), free slots, segments (id -> slots) and pins (key, owner, count)."""
    import sqlite3

    path = os.path.join(os.fspath(root), "index.sqlite")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cols = ["key", "parent", "seg", "slot", "checksum", "state", "owner", "children"]
        blocks = {r[0]: dict(zip(cols, r)) for r in db.execute(f"SELECT {', '.join(cols)} FROM blocks")}
        free = [tuple(r) for r in db.execute("SELECT seg, slot FROM free_slots")]
        segments = dict(db.execute("SELECT id, slots FROM segments").fetchall())
        pins = [tuple(r) for r in db.execute("SELECT key, owner, count FROM pins")]
    finally:
        db.close()
    return {"blocks": blocks, "free": free, "segments": segments, "pins": pins}


def check_index(root) -> dict:
    """Asserts the index's invariants and returns index_rows(root):

    - every slot of every segment is either free or holds exactly one block (nothing leaked,
      nothing shared);
    - presence is prefix-closed: a block's parent is ROOT or a block, a READY block's parent
      is READY;
    - each block's ``children`` is the number of blocks naming it as parent;
    - pin counts are positive.
    """
    root_key = bytes(16)
    ix = index_rows(root)
    blocks, free = ix["blocks"], ix["free"]
    used = [(b["seg"], b["slot"]) for b in blocks.values()]
    assert len(set(used)) == len(used), "two blocks share a slot"
    assert len(set(free)) == len(free)
    assert not set(used) & set(free), f"slots both used and free: {set(used) & set(free)}"
    every = {(s, i) for s, n in ix["segments"].items() for i in range(n)}
    assert set(used) | set(free) == every, (
        f"slots leaked: {sorted(every - set(used) - set(free))[:8]}, unknown: {sorted((set(used) | set(free)) - every)[:8]}")
    kids: dict = {}
    for k, b in blocks.items():
        p = b["parent"]
        if p != root_key and b["state"] == 2:
            assert p not in blocks, f"DOOMED block {k.hex()} under a parent still present"
            continue  # dropped while being written (its parent failed verification)
        if p != root_key:
            assert p in blocks, f"block {k.hex()} has no parent in the index (not prefix-closed)"
            if b["state"] == 1:
                assert blocks[p]["state"] == 1, f"READY block {k.hex()} under a WRITING parent"
            kids[p] = kids.get(p, 0) + 1
    for k, b in blocks.items():
        assert b["children"] == kids.get(k, 0), f"block {k.hex()}: children {b['children']}, actually {kids.get(k, 0)}"
    assert all(c > 0 for _k, _o, c in ix["pins"]), ix["pins"]
    return ix
