"""The block store across processes: writers SIGKILLed at random moments, and several processes
on one store at once.

Children run ``kv_store_writer.py``; a block's bytes are derived from its key
(``block_bytes``), so the parent knows what every block must hold without being told. After each
kill the parent opens the store (which reaps the dead writer's reservations and pins), checks
the index's invariants, and reads back every block the index has: each read either verifies
and equals the expected bytes, or raises BlockCorrupt (detected, and then the block is gone).
A block that verifies with other bytes fails the test. What the checks assert does not depend
on when the kill lands; only how much was written before it does.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import uring_status
from dpmove.kv.model import ModelSpec
from dpmove.kv.store import BlockCorrupt, BlockStore
from kv_store_writer import block_bytes, check_index, index_rows

WRITER = str(Path(__file__).with_name("kv_store_writer.py"))
CRASH_SPEC = ModelSpec("crash", 4, 3000, 8)  # Full Block 96,000 B over 24 pages: writes can tear
KILLS = int(os.environ.get("DPMOVE_CRASH_KILLS", "50"))


def spawn(mode: str, root: Path, args: dict, stderr) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WRITER, mode, str(root), json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=stderr)


def first_line(p: subprocess.Popen, timeout_s: float = 60.0) -> str:
    ready, _, _ = select.select([p.stdout], [], [], timeout_s)
    assert ready, f"no output from the writer in {timeout_s} s"
    return p.stdout.readline().decode()


def read_back_everything(root: Path, spec: ModelSpec) -> dict:
    """Opens the store, reads every block its index has and compares it with what it must hold.
    Returns counts: blocks verified, corrupt (detected and dropped), reaped rows."""
    with BlockStore(root, spec) as st:
        reaped = st.counters["reaped"]
        ix = check_index(root)
        # nothing of the dead writer is left: no reservation, no pin
        assert [b for b in ix["blocks"].values() if b["state"] == 0] == []
        assert ix["pins"] == []
        keys = [k for k, b in ix["blocks"].items() if b["state"] == 1]
        sb, fb = st.slot_bytes, spec.full_block_bytes
        region = st.engine.alloc(max(1, len(keys)) * sb)
        view = region.numpy()
        corrupt: list = []
        try:
            st.read(keys, region, np.arange(len(keys)) * sb).result()
            ok = np.ones(len(keys), dtype=bool)
        except BlockCorrupt as e:
            ok, corrupt = e.ok, e.keys
            assert set(corrupt) == {k for k, good in zip(keys, ok) if not good}
            assert not st.contains(corrupt).any(), "a corrupt block stayed in the index"
        for i, k in enumerate(keys):
            if ok[i]:
                assert np.array_equal(view[i * sb: i * sb + fb], block_bytes(k, fb)), (
                    f"block {k.hex()} verified but holds other bytes than were put")
        check_index(root)
        return {"blocks": len(keys), "corrupt": len(corrupt), "reaped": reaped}


@pytest.mark.slow
@pytest.mark.timeout(240, method="thread")
def test_writer_killed_at_random_moments(tmp_path: Path, rng) -> None:
    """KILLS times: a writer (alternately on the io_uring and the thread-pool backend, where
    io_uring is usable) puts, evicts and reads in a store of 12 slots; it is SIGKILLed 20-300 ms
    after its first put is durable; then everything the index has must read back right or be
    detected as corrupt, and nothing of the dead writer may be left in the index."""
    root = tmp_path / "store"
    slot = 98_304
    args = {"spec": [CRASH_SPEC.name, 4, 3000, 8], "capacity": 12 * slot, "segment_slots": 5}
    backends = ["io_uring", "threadpool"] if uring_status()[0] else ["threadpool"]
    totals = {"blocks": 0, "corrupt": 0, "reaped": 0}
    t0 = time.monotonic()
    for it in range(KILLS):
        args["seed"] = int(rng.integers(1 << 32))
        args["backend"] = backends[it % len(backends)]
        with open(tmp_path / "writer.err", "w+b") as err, spawn("crash", root, args, err) as p:
            try:
                line = first_line(p)
                if not line.startswith("ready "):
                    p.wait(30)
                    err.seek(0)
                    pytest.fail(f"iteration {it}: the writer failed ({p.returncode}): {line!r} {err.read().decode()}")
                time.sleep(float(rng.uniform(0.02, 0.3)))
            finally:
                p.send_signal(signal.SIGKILL)
                p.wait()
            err.seek(0)
            out = p.stdout.read().decode()
            # killed by us, not ended by itself (a read that verified with other bytes exits 3)
            assert p.returncode == -signal.SIGKILL, f"iteration {it}: exit {p.returncode}: {out} {err.read().decode()}"
        got = read_back_everything(root, CRASH_SPEC)
        for k in totals:
            totals[k] += got[k]
    print(f"{KILLS} kills in {time.monotonic() - t0:.1f} s: {totals}")
    assert totals["blocks"] > 0
    ix = index_rows(root)
    assert sum(ix["segments"].values()) == 12  # slots were reused, never more than the capacity


def test_torn_write_over_a_reused_slot(tmp_path: Path, rng) -> None:
    """The crash a SIGKILL cannot produce, written directly: a block is evicted, its slot
    reserved for a new block whose write tears (half the new data over the old block, old
    trailer intact), and the index then says READY (as if the commit had been reached with the
    data lost in a power cut). The new block reads as BlockCorrupt; the evicted one never comes
    back under the new key; the others are fine; and after an index rebuild the torn slot's
    stale trailer brings the old block back only with its own, intact-checking bytes."""
    spec = CRASH_SPEC
    root = tmp_path / "store"
    fb = spec.full_block_bytes
    with BlockStore(root, spec, capacity_bytes=3 * 98_304) as st:
        old = st.keys(rng.integers(0, 1 << 30, 8))
        keep = st.keys(rng.integers(0, 1 << 30, 16))
        buf = np.concatenate([block_bytes(k, fb) for k in old + keep])
        st.put(old, None, buf[:fb], [0])
        st.put(keep, None, buf[fb:], [0, fb])
        slot = index_rows(root)["blocks"][old[0]]
        new = st.keys(rng.integers(0, 1 << 30, 8))
        st.lookup(keys=keep)  # old is the LRU leaf: the new block takes its slot
        real_write = st.engine.write

        def torn(f, region, batch, **kw):  # writes only the first half of the new data
            b = np.asarray(batch).copy()
            b[:, 2] = fb // 2 // 4096 * 4096  # (O_DIRECT lengths stay aligned)
            return real_write(f, region, b, **kw)

        st.engine.write = torn
        try:
            st.put(new, None, block_bytes(new[0], fb), [0])
        finally:
            del st.engine.write
        assert index_rows(root)["blocks"][new[0]]["slot"] == slot["slot"]
        assert not st.contains(old)[0]
        with pytest.raises(BlockCorrupt, match=new[0].hex()):
            st.get(new)
        assert not st.contains(new)[0] and st.contains(keep).all()
        got = st.get(keep)
        for k, g in zip(keep, got):
            np.testing.assert_array_equal(g.reshape(-1), block_bytes(k, fb))
        assert st.verify() == []
    # the slot holds half new bytes and old's trailer: a rebuild brings old back, and its read
    # is detected as corrupt (its data no longer matches its trailer)
    (root / "index.sqlite").write_bytes(b"\xff" * 8192)
    with pytest.warns(RuntimeWarning, match="rebuilt"):
        st = BlockStore(root, spec)
    with st:
        assert st.contains(old)[0]
        with pytest.raises(BlockCorrupt, match=old[0].hex()):
            st.get(old)
        assert not st.contains(old)[0]
        assert st.verify() == []
        assert st.contains(keep).all()
        check_index(root)


@pytest.mark.slow
@pytest.mark.timeout(180, method="thread")
def test_two_writers_and_a_reader(tmp_path: Path, rng) -> None:
    """Two writer processes put overlapping prompts (shared prefixes, the same prompts in other
    orders) while a reader process looks up and reads them, all on one store. No process fails;
    outcomes are STORED, EXISTS, or NO_PARENT right after a block the other writer was still
    writing; afterwards every block in the index verifies, and a sequential pass completes
    every prompt."""
    spec = ModelSpec("multi", 2, 2000, 4)  # Full Block 16,000 B
    root = tmp_path / "store"
    bt = spec.block_tokens
    families = [rng.integers(0, 1 << 30, 3 * bt) for _ in range(6)]
    prompts = []
    for fam in families:  # each family: its head alone, and several tails under it
        prompts.append(fam[: bt].tolist())
        for _ in range(4):
            n = int(rng.integers(1, 4))
            prompts.append(fam[: bt * int(rng.integers(1, 4))].tolist() + rng.integers(0, 1 << 30, n * bt).tolist())
    stop = tmp_path / "stop"
    base = {"spec": [spec.name, 2, 2000, 4], "prompts": prompts, "stop": str(stop), "capacity": 1 << 30}
    with BlockStore(root, spec, capacity_bytes=1 << 30):
        pass  # created before the children race to
    procs: list = []
    outs: dict = {}
    with contextlib.ExitStack() as stack:
        for role, seed in (("reader", 1), ("writer", 2), ("writer", 3)):
            err = stack.enter_context(open(tmp_path / f"{role}{seed}.err", "w+b"))
            p = stack.enter_context(spawn(role, root, dict(base, seed=seed), err))
            stack.callback(lambda p=p: p.poll() is None and (p.kill(), p.wait()))
            procs.append((role, p, err))
        for role, p, _err in procs[1:]:
            outs[p.pid] = p.stdout.read().decode()
            assert p.wait(120) == 0, f"{role} exit {p.returncode}: {outs[p.pid]}"
        stop.touch()
        _role, p, _err = procs[0]
        outs[p.pid] = p.stdout.read().decode()
        assert p.wait(60) == 0, f"reader exit {p.returncode}: {outs[p.pid]}"
        for role, _p, err in procs:
            err.seek(0)
            text = err.read().decode()
            assert "Traceback" not in text, f"{role}: {text}"
    for role, p, _err in procs:
        assert outs[p.pid].startswith("done "), outs[p.pid]
        print(role, outs[p.pid].strip())
    got = read_back_everything(root, spec)
    assert got["corrupt"] == 0
    with BlockStore(root, spec) as st:
        fb = spec.full_block_bytes
        for toks in prompts:
            keys = st.keys(np.array(toks))
            buf = np.concatenate([block_bytes(k, fb) for k in keys])
            out = st.put(keys, None, buf, np.arange(len(keys)) * fb)
            assert set(out.tolist()) <= {0, 1}, out  # STORED or EXISTS: nothing is being written now
        allk = sorted({k for toks in prompts for k in st.keys(np.array(toks))})
        assert st.contains(allk).all() and len(st) == len(allk)
        got = st.get(allk)
        for k, g in zip(allk, got):
            np.testing.assert_array_equal(g.reshape(-1), block_bytes(k, fb))
    check_index(root)
