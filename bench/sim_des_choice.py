#!/usr/bin/env python3
"""Discrete-event engine choice for ``dpmove sim``: SimPy 4 against a hand-written heapq loop.

The same closed queueing model runs on both engines:
  N agents, each doing T turns in sequence. Turn t of agent a:
    1 FIFO storage NIC, node (a + t) % 2 (2 single-server nodes), service s_nic[a, t] (exp, mean 50 ms)
    2 FIFO GPU, device (a + t) % 16 (16 single-server devices),   service s_gpu[a, t] (exp, mean 20 ms)
    3 decode, no resource,                                         delay s_dec[a, t]   (exp, mean 5 s)
  Every agent starts turn 0 at t = 0, requesting in agent order (a = 0 first).
Round robin is static in (a, t), so node choice does not depend on event order. All service times
are drawn up front from one seeded numpy Generator; both engines read the same Python floats and
compute every time as ``now + delay``, so results agree bit for bit barring equal-time ties
(which exponential draws make improbable after t = 0). The check asserts agreement to 1e-9 relative.

Counts: a turn has 5 logical events (NIC request, NIC release, GPU request, GPU release, decode
end); events/s = 5 * turns / wall. proj_s extrapolates wall linearly to 7.5 M turns, the target
workload (<= 600 s on a 2-core machine; the engines are single threaded).

Exit status 0; 2 when simpy is not importable; AssertionError when the engines disagree.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import platform
import statistics
import sys
import time
from collections import deque

import numpy as np

try:
    import simpy
except ImportError:  # contract: exit 2 with the install hint, before any work
    simpy = None

N_NIC, N_GPU = 2, 16
MEAN_NIC, MEAN_GPU, MEAN_DEC = 0.050, 0.020, 5.0
EVENTS_PER_TURN = 5
TARGET_TURNS = 7_500_000


def draw(agents: int, turns: int, seed: int) -> tuple[list, list, list]:
    """Service times as nested lists [agent][turn] of Python floats (numpy scalars are slow to index)."""
    rng = np.random.default_rng(seed)
    shape = (agents, turns)
    return tuple(rng.exponential(m, shape).tolist() for m in (MEAN_NIC, MEAN_GPU, MEAN_DEC))


# ---------------------------------------------------------------------------------------------
# (a) SimPy: one process per agent, simpy.Resource(capacity=1) per server.
# ---------------------------------------------------------------------------------------------
def run_simpy(s_nic: list, s_gpu: list, s_dec: list) -> list[float]:
    """Returns each agent's finish time."""
    env = simpy.Environment()
    nics = [simpy.Resource(env, capacity=1) for _ in range(N_NIC)]
    gpus = [simpy.Resource(env, capacity=1) for _ in range(N_GPU)]
    finish = [0.0] * len(s_nic)

    def agent(a: int):
        nic_a, gpu_a, dec_a = s_nic[a], s_gpu[a], s_dec[a]
        for t in range(len(nic_a)):
            with nics[(a + t) % N_NIC].request() as req:
                yield req
                yield env.timeout(nic_a[t])
            with gpus[(a + t) % N_GPU].request() as req:
                yield req
                yield env.timeout(gpu_a[t])
            yield env.timeout(dec_a[t])
        finish[a] = env.now

    for a in range(len(s_nic)):
        env.process(agent(a))
    env.run()
    return finish


# ---------------------------------------------------------------------------------------------
# (b) Hand-written loop: heap of (time, seq, callback, agent); callbacks are bound methods.
#     seq (a global counter) makes equal times pop in push order and keeps callbacks uncompared.
#     A server is a busy flag plus a deque of waiting agents; 3 heap pushes per turn.
# ---------------------------------------------------------------------------------------------
class HeapSim:
    def __init__(self, s_nic: list, s_gpu: list, s_dec: list):
        self.s_nic, self.s_gpu, self.s_dec = s_nic, s_gpu, s_dec
        self.turns = len(s_nic[0]) if s_nic else 0
        self.now = 0.0
        self.heap: list = []
        self.seq = itertools.count()
        self.turn = [0] * len(s_nic)             # current turn index per agent
        self.finish = [0.0] * len(s_nic)
        self.nic_busy = [False] * N_NIC
        self.nic_q = [deque() for _ in range(N_NIC)]
        self.gpu_busy = [False] * N_GPU
        self.gpu_q = [deque() for _ in range(N_GPU)]

    def _push(self, t: float, cb, a: int) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), cb, a))

    # Invariant: busy[k] is True iff an agent is in service at server k; queued agents wait FIFO.
    def _nic_request(self, a: int) -> None:
        k = (a + self.turn[a]) % N_NIC
        if self.nic_busy[k]:
            self.nic_q[k].append(a)
        else:
            self.nic_busy[k] = True
            self._push(self.now + self.s_nic[a][self.turn[a]], self._nic_done, a)

    def _nic_done(self, a: int) -> None:
        k = (a + self.turn[a]) % N_NIC
        q = self.nic_q[k]
        if q:                                    # hand the server to the head of the queue
            b = q.popleft()
            self._push(self.now + self.s_nic[b][self.turn[b]], self._nic_done, b)
        else:
            self.nic_busy[k] = False
        k = (a + self.turn[a]) % N_GPU
        if self.gpu_busy[k]:
            self.gpu_q[k].append(a)
        else:
            self.gpu_busy[k] = True
            self._push(self.now + self.s_gpu[a][self.turn[a]], self._gpu_done, a)

    def _gpu_done(self, a: int) -> None:
        k = (a + self.turn[a]) % N_GPU
        q = self.gpu_q[k]
        if q:
            b = q.popleft()
            self._push(self.now + self.s_gpu[b][self.turn[b]], self._gpu_done, b)
        else:
            self.gpu_busy[k] = False
        self._push(self.now + self.s_dec[a][self.turn[a]], self._decode_done, a)

    def _decode_done(self, a: int) -> None:
        t = self.turn[a] + 1
        self.turn[a] = t
        if t < self.turns:
            self._nic_request(a)
        else:
            self.finish[a] = self.now

    def run(self) -> list[float]:
        """Returns each agent's finish time."""
        for a in range(len(self.turn)):          # t = 0 requests, in agent order (as SimPy)
            if self.turns:
                self._nic_request(a)
        heap, pop = self.heap, heapq.heappop
        while heap:
            self.now, _, cb, a = pop(heap)
            cb(a)
        return self.finish


def run_heapq(s_nic: list, s_gpu: list, s_dec: list) -> list[float]:
    return HeapSim(s_nic, s_gpu, s_dec).run()


# ---------------------------------------------------------------------------------------------
def time_engine(fn, data, repeat: int) -> tuple[float, list[float]]:
    """Median wall seconds over `repeat` runs, and the last run's finish times."""
    walls, finish = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        finish = fn(*data)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), finish


def close(x: float, y: float, rel: float = 1e-9) -> bool:
    return abs(x - y) <= rel * max(abs(x), abs(y), 1e-300)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, default=2000)
    p.add_argument("--turns", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3, help="runs per engine; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if simpy is None:
        print("sim_des_choice: simpy is not importable; run `pip install simpy`", file=sys.stderr)
        return 2
    if args.agents < 1 or args.turns < 1 or args.repeat < 1:
        p.error("--agents, --turns and --repeat must be >= 1")

    data = draw(args.agents, args.turns, args.seed)
    turns = args.agents * args.turns
    rows, finishes = {}, {}
    for name, fn in (("simpy", run_simpy), ("heapq", run_heapq)):
        wall, finishes[name] = time_engine(fn, data, args.repeat)
        rows[name] = {"wall_s": wall, "turns_per_s": turns / wall,
                      "events_per_s": EVENTS_PER_TURN * turns / wall,
                      "proj_7p5M_turns_s": wall * TARGET_TURNS / turns}

    # Contract: same job completion time (makespan) and same per-agent finish times.
    fa, fb = finishes["simpy"], finishes["heapq"]
    assert close(max(fa), max(fb)), f"makespan differs: simpy {max(fa)!r} heapq {max(fb)!r}"
    bad = [a for a in range(args.agents) if not close(fa[a], fb[a])]
    assert not bad, f"{len(bad)} agents' finish times differ, first agent {bad[0]}"
    ratio = rows["simpy"]["wall_s"] / rows["heapq"]["wall_s"]

    if args.json:
        print(json.dumps({"python": platform.python_version(), "simpy": simpy.__version__,
                          "agents": args.agents, "turns": args.turns, "repeat": args.repeat,
                          "seed": args.seed, "total_turns": turns,
                          "events": EVENTS_PER_TURN * turns, "makespan_s": max(fb),
                          "engines": rows, "ratio_simpy_over_heapq": ratio}, indent=2))
        return 0
    print(f"python {platform.python_version()}  simpy {simpy.__version__}  agents {args.agents}  "
          f"turns {args.turns}  ({turns} turns, {EVENTS_PER_TURN * turns} events)  "
          f"repeat {args.repeat}  makespan {max(fb):.6f} s (engines agree)")
    print(f"{'engine':<8}{'wall_s':>10}{'turns/s':>12}{'events/s':>13}{'proj_7.5M_s':>13}")
    for name, r in rows.items():
        print(f"{name:<8}{r['wall_s']:>10.3f}{r['turns_per_s']:>12,.0f}"
              f"{r['events_per_s']:>13,.0f}{r['proj_7p5M_turns_s']:>13.1f}")
    print(f"ratio simpy/heapq wall: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
