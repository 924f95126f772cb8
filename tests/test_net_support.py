"""Helpers shared by the test_net_* files (this module holds no tests).

`net_engines` is a factory fixture: engines it made are closed at teardown, and every request a
`Peer.write` returned through `tracked_write` must then be terminal and quiesced with no
duplicate finish. `Child` runs a small receiver or writer script in another process (to kill -9
or SIGSTOP it) and talks to it over its stdin / stdout, one line per command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import numpy as np
import pytest

import dpmove

TRANSPORTS = [
    pytest.param(("tcp", 1), id="tcp"),
    pytest.param(("tcp", 4), id="tcp4"),
    pytest.param(("shm", 1), id="shm"),
]
TERMINAL = (
    dpmove.RequestState.DONE,
    dpmove.RequestState.FAILED,
    dpmove.RequestState.TIMED_OUT,
    dpmove.RequestState.CANCELLED,
)


class NetEngines:
    def __init__(self) -> None:
        self.engines: List[dpmove.Engine] = []
        self.requests: List[Any] = []

    def __call__(self, name: str = "", **kw: Any) -> dpmove.Engine:
        eng = dpmove.Engine(name=name, **kw)
        self.engines.append(eng)
        return eng

    def write(self, peer: dpmove.Peer, *args: Any, **kw: Any):
        req = peer.write(*args, **kw)
        self.requests.append(req)
        return req

    def close(self) -> None:
        for eng in self.engines:
            eng.close(timeout_s=30)
        for req in self.requests:
            assert req.wait_quiesced(30), f"{req} not quiesced after its engines closed"
            assert req.state in TERMINAL, req
            assert req.duplicate_finishes == 0, req
            st = req.status
            assert not np.isin(st, [dpmove.ENTRY_PENDING, dpmove.ENTRY_RUNNING]).any(), (req, st)


@pytest.fixture
def net_engines() -> Iterator[NetEngines]:
    ne = NetEngines()
    yield ne
    ne.close()


def pair(ne: NetEngines, transport: str, streams: int = 1, size: int = 1 << 20, **kw: Any):
    """Receiver engine, its exposed region (alloc, zeroed) and handle, writer engine, peer."""
    a = ne("recv")
    b = ne("send")
    dst = a.alloc(size)
    h = a.expose(dst, writable=True)
    p = b.connect(a.metadata(), transport=transport, streams=streams, **kw)
    assert p.transport == transport, (p, transport)
    return a, dst, h, b, p


def finished(req, timeout_s: float = 60.0):
    state = req.wait(timeout_s)
    assert state != dpmove.RequestState.PENDING, f"{req} still pending after {timeout_s} s"
    assert req.wait_quiesced(timeout_s), f"{req} not quiesced after {timeout_s} s"
    assert req.duplicate_finishes == 0, req
    return state


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, step: float = 0.01) -> Any:
    """Bounded polling: returns cond()'s first truthy value, fails after timeout_s."""
    end = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(step)


def drain_notifications(eng: dpmove.Engine, quiet_s: float = 0.2) -> list:
    out = []
    while True:
        n = eng.next_notification(timeout_s=quiet_s)
        if n is None:
            return out
        out.append(n)


# --- child processes -------------------------------------------------------------------------

RECEIVER = textwrap.dedent(
    r'''
    import hashlib, json, sys, numpy as np, dpmove
    host, size, name, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    eng = dpmove.Engine(name=name, listen_host=host, listen_port=port)
    dst = eng.alloc(size)
    h = eng.expose(dst, writable=True)
    buf = dst.numpy()
    print(json.dumps({"md": eng.metadata().hex(), "handle": h.to_bytes().hex(), "pid": __import__("os").getpid()}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "sha":
            off, n = int(cmd[1]), int(cmd[2])
            print(hashlib.sha256(buf[off:off + n].tobytes()).hexdigest(), flush=True)
        elif cmd[0] == "note":
            n = eng.next_notification(timeout_s=float(cmd[1]))
            print(json.dumps(None if n is None else {"data": n.data.hex(), "peer": n.peer, "request": n.request}), flush=True)
        elif cmd[0] == "stats":
            print(json.dumps(eng.net_stats()), flush=True)
        elif cmd[0] == "quit":
            break
    eng.close()
    '''
)

WRITER = textwrap.dedent(
    r'''
    import json, sys, numpy as np, dpmove
    md, handle, transport = bytes.fromhex(sys.argv[1]), bytes.fromhex(sys.argv[2]), sys.argv[3]
    block, count, src_size, dst_size = (int(x) for x in sys.argv[4:8])
    eng = dpmove.Engine(name="child-writer")
    p = eng.connect(md, transport=transport)
    src = eng.alloc(src_size)
    src.numpy()[:] = 0xAB
    idx = np.arange(count, dtype=np.int64) * block
    batch = dpmove.entries(idx % dst_size, idx % src_size, block)
    print("ready", flush=True)
    reqs = []
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "write":  # write <notify>: post the whole batch
            reqs.append(p.write(src, handle, batch, notify=cmd[1].encode(), timeout_s=60))
            print("posted", flush=True)
        elif cmd[0] == "result":
            r = reqs[-1]
            r.wait(60)
            print(json.dumps({"state": str(r.state)}), flush=True)
        elif cmd[0] == "quit":
            break
    '''
)


class Child:
    """A python script in another process; `ask()` sends one command line and reads one line."""

    def __init__(self, tmp: Path, name: str, source: str, args: List[str], prefix: Optional[List[str]] = None) -> None:
        script = tmp / f"{name}.py"
        script.write_text(source)
        cmd = (prefix or []) + [sys.executable, str(script), *args]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )

    def line(self, timeout_s: float = 30.0) -> str:
        import select

        end = time.monotonic() + timeout_s
        fd = self.proc.stdout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"child {self.proc.args} said nothing for {timeout_s} s")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                s = fd.readline()
                if not s:
                    err = self.proc.stderr.read() if self.proc.poll() is not None else ""
                    raise AssertionError(f"child exited ({self.proc.poll()}): {err}")
                return s.strip()

    def json(self, timeout_s: float = 30.0) -> Any:
        return json.loads(self.line(timeout_s))

    def ask(self, cmd: str, timeout_s: float = 30.0) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.line(timeout_s)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except Exception:  # noqa: BLE001 - best effort
                pass


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    made: List[Child] = []

    def make(name: str, source: str, args: List[str], prefix: Optional[List[str]] = None) -> Child:
        c = Child(tmp_path, name, source, [str(a) for a in args], prefix)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kill()


def spawn_receiver(children, size: int, host: str = "127.0.0.1", name: str = "child-recv", prefix=None, port: int = 0):
    c = children(name, RECEIVER, [host, size, name, port], prefix)
    info = c.json(60)
    return c, bytes.fromhex(info["md"]), bytes.fromhex(info["handle"])
