"""Discrete-event model of a PD-disaggregated cluster running agent trajectories.

Event engine: a heapq of (time_s, seq, callback, arg) tuples; ``bench/sim_des_choice.py``
measures it against SimPy on the same queueing model.

What is modelled (one engine per GPU, `gpus_per_node` per node):

- Storage NIC per node: a FIFO read server (``snic_read_Bps``) and a FIFO write server
  (``snic_write_Bps``; full duplex). A read reserves host DRAM on its node before it starts
  (``dram_bytes``; reads wait FIFO for room, except that a read starts on an empty DRAM even
  when it is larger). Only whole Full Blocks are stored and read; the tail of a context that
  does not fill a block is recomputed.
- PE-read with layerwise prefill: storage -> PE host DRAM; the KV stays there until the PE's
  last batch on that request ends. Without layerwise prefill (Basic) the batch's reads are
  issued when the batch forms and each read's DRAM is free once it lands (the KV goes to HBM
  whole). DE-read: storage -> DE host DRAM; it stays until decode starts (DUALPATH.md section
  3: the hit KV waits in the DE buffer and the new KV joins it). The KV the PE sends to the DE
  buffer is not counted against DE DRAM: decode starts as soon as it lands.
- PE batch time: layerwise, max(compute, bytes in / B, bytes out / B) + one layer's compute
  (the pipeline fill); otherwise bytes in / B + compute + bytes out / B (load, compute, send
  in turn) with the batch's whole KV fitting in HBM. B is the GPU's compute NIC. Batches are
  built by ``scheduler.build_prefill_batch`` (the 300 ms quota, chunking) under the
  scheduler; otherwise FIFO up to ``basic_batch_tokens`` new tokens, whole requests only.
- Decode: each DE steps its batch continuously; the step time follows the batch size and its
  context (a sequence counts its context plus half its generated tokens) and is re-evaluated
  whenever a sequence joins or leaves. A DE reserves HBM for the request's final KV (context,
  new and generated tokens) when it is assigned.
- Persistence: after decode, the turn's new whole blocks are written through the DE node's
  storage NIC; the agent's next turn arrives when that write ends plus the think time.
- Oracle moves every byte in zero time (storage reads and writes, host<->GPU and PD
  transfers).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from itertools import islice
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

from .. import scheduler as sched
from .hardware import ClusterSpec, ComputeModel

__all__ = ["SimConfig", "Simulation", "simulate", "turn_tokens"]

# What freed capacity, for Simulation._schedule.
_ARRIVAL, _PE_FREED, _DE_FREED = 1, 2, 3


@dataclass(frozen=True)
class SimConfig:
    """One run: cluster, model, policy and workload timing."""

    cluster: ClusterSpec
    model: ComputeModel
    policy: sched.Policy
    # Batching without the section-6 quota: FIFO up to this many new tokens, whole requests
    # (the size of a common chunked-prefill budget, e.g. SGLang's default 8192).
    basic_batch_tokens: int = 8192
    bin_s: float = 10.0            # utilisation timeline resolution
    alpha_s: float = 3.0           # alpha = tokens a storage NIC reads in this many seconds
    beta_s: float = 5.0            # beta = tokens a PE GPU computes in this many seconds
    quota_s: float = 0.3           # attention-time quota of one PE batch

    def params(self, typical_ctx: float) -> sched.SchedulerParams:
        m = self.model
        alpha = self.alpha_s * self.cluster.snic_read_Bps / m.bytes_per_token
        beta = self.beta_s * m.tokens_per_s(typical_ctx)
        return sched.SchedulerParams(alpha_tokens=alpha, beta_tokens=beta, quota_s=self.quota_s)


def turn_tokens(trace, model: ComputeModel):
    """Per turn (int64 arrays [num_turns]): tokens read from storage (the context's whole
    Full Blocks) and tokens to prefill (the context's partial block, recomputed, plus the
    append)."""
    hit = model.stored_tokens(trace.context)
    return hit, trace.context - hit + trace.append


class _Req:
    """One turn of one agent while it is in the cluster."""

    __slots__ = ("row", "arrive", "ctx", "hit", "new", "left", "gen", "final", "hbm",
                 "pe", "de", "side", "hit_bytes", "t_first", "t_dec", "sync")

    def __init__(self, row: int, arrive: float, ctx: int, hit: int, new: int, gen: int,
                 hbm: float, hit_bytes: float) -> None:
        self.row = row
        self.arrive = arrive
        self.ctx = ctx          # tokens whose KV exists for the next chunk (hit + computed so far)
        self.hit = hit          # tokens read from storage (whole blocks)
        self.new = new          # tokens to prefill this turn
        self.left = new         # of those, not computed yet
        self.gen = gen
        self.final = hit + new + gen
        self.hbm = hbm          # DE HBM reserved: KV of `final` tokens
        self.hit_bytes = hit_bytes
        self.pe = -1
        self.de = -1
        self.side = sched.READ_PE
        self.t_first = 0.0
        self.t_dec = 0.0
        self.sync = False       # read on the PE's critical path (no layerwise prefill)


class _Busy:
    """Busy seconds per (bin, unit), bins of bin_s seconds, grown on demand (rows of Python
    lists: one add per batch or read, cheaper than NumPy scalar updates)."""

    def __init__(self, units: int, bin_s: float) -> None:
        self.bin_s = bin_s
        self.units = units
        self.rows: List[List[float]] = []

    def add(self, unit: int, t0: float, t1: float) -> None:
        if t1 <= t0:
            return
        b, rows = self.bin_s, self.rows
        i0, i1 = int(t0 // b), int(t1 // b)
        while len(rows) <= i1:
            rows.append([0.0] * self.units)
        if i0 == i1:
            rows[i0][unit] += t1 - t0
            return
        rows[i0][unit] += (i0 + 1) * b - t0
        for i in range(i0 + 1, i1):
            rows[i][unit] += b
        rows[i1][unit] += t1 - i1 * b

    def total(self) -> float:
        """Busy seconds over all bins and units."""
        return float(sum(map(sum, self.rows)))

    def util(self, nbins: int) -> np.ndarray:
        """Busy fraction [nbins, units]."""
        out = np.zeros((nbins, self.units))
        n = min(nbins, len(self.rows))
        if n:
            out[:n] = np.asarray(self.rows[:n]) / self.bin_s
        return np.clip(out, 0.0, 1.0)


class Simulation:
    """Runs a trace (``dpmove.sim.trace.Trace``) through the cluster.

    `start_s[i]` is when agent i submits its first turn (offline: all 0). Per-turn results are
    arrays indexed by the trace's turn row: arrival, first token (TTFT), second token (TTST),
    TPOT, finish. `progress(done_turns)` is called every few thousand turns."""

    def __init__(self, cfg: SimConfig, trace, start_s: Optional[np.ndarray] = None,
                 progress: Optional[Callable[[int], None]] = None) -> None:
        c, m, pol = cfg.cluster, cfg.model, cfg.policy
        self.cfg, self.trace, self.progress = cfg, trace, progress
        self.m, self.pol = m, pol
        if pol.dual_path and not pol.layerwise and not pol.free_io:
            raise ValueError(f"policy {pol.name!r}: dual-path loading needs layerwise prefill here (the DE-read "
                             "path streams Layer Blocks to the PE); set layerwise=True")
        g = c.gpus_per_node
        self.P, self.D, self.g = c.p_nodes, c.d_nodes, g
        nodes = self.P + self.D
        n_agents = trace.num_agents
        self.start_s = np.zeros(n_agents) if start_s is None else np.asarray(start_s, dtype=np.float64)
        if self.start_s.shape != (n_agents,):
            raise ValueError(f"start_s must have one entry per agent ({n_agents}), got shape {self.start_s.shape}")
        ctx_all = trace.context + trace.append
        typical_ctx = float(ctx_all.mean()) if len(ctx_all) else 0.0
        self.params = cfg.params(typical_ctx)
        self.bpt = float(m.bytes_per_token)
        self.B = c.cnic_Bps
        self.read_bw_tok = c.snic_read_Bps / self.bpt          # tokens per second
        # Nodes: PE engine e is on node e // g, DE engine e on node P + e // g.
        self.pe_tok = [0.0] * (self.P * g)
        # Per PE node: its least-loaded engine's tokens and index (see pick_prefill_engine_by_node).
        self.node_min_tok = [0.0] * self.P
        self.node_min_idx = [n * g for n in range(self.P)]
        self.pe_seq = np.zeros(self.P * g, dtype=np.int64)
        # DE load reports as lists: a group's slice goes to pick_decode_engine as it is.
        self.de_tok = [0.0] * (self.D * g)
        self.de_seq = [0] * (self.D * g)
        self.de_hbm = [float(m.hbm_kv_bytes)] * (self.D * g)
        # Per DE group (node): total tokens and the most free HBM of any of its engines.
        self.group_tok = [0.0] * self.D
        self.group_hbm = [float(m.hbm_kv_bytes)] * self.D
        self.blocked = 0
        self.pe_rr = sched.RoundRobin(self.P * g)
        self.de_rr = sched.RoundRobin(self.D * g)
        self.side_rr = 0
        # Storage NIC and DRAM per node.
        self.read_free = [0.0] * nodes              # time the read server drains its FIFO
        self.write_free = [0.0] * nodes
        self.dram_used = np.zeros(nodes)
        self.dram_wait: List[deque] = [deque() for _ in range(nodes)]
        self.wait_tok = [0.0] * nodes               # tokens of reads waiting for DRAM
        self.short_at = [-math.inf] * nodes         # from when read_q <= alpha (_short_changed)
        self.read_bytes = np.zeros(nodes)
        # Engines.
        self.pe_ready: List[deque] = [deque() for _ in range(self.P * g)]
        self.pe_busy = [False] * (self.P * g)
        self.pe_wait: List[list] = [[0, None, 0.0] for _ in range(self.P * g)]  # sync loads left, batch, duration
        ne = self.D * g
        self.de_heap: List[list] = [[] for _ in range(ne)]
        self.de_steps = [0.0] * ne      # decode steps done since the engine started (continuous)
        self.de_tlast = [0.0] * ne
        self.de_step_s = [0.0] * ne
        self.de_n = [0] * ne
        self.de_ctx = [0.0] * ne
        self.de_ver = [0] * ne
        self.de_next = [math.inf] * ne  # time of the DE's pending valid tick
        self.de_since = [0.0] * ne
        # Timeline.
        self.snic_busy = _Busy(nodes, cfg.bin_s)
        self.pe_gpu_busy = _Busy(self.P * g, cfg.bin_s)
        self.de_gpu_busy = _Busy(self.D * g, cfg.bin_s)
        # Results per turn row.
        nt = trace.num_turns
        self.t_arrive = np.full(nt, np.nan)
        self.t_first = np.full(nt, np.nan)
        self.t_second = np.full(nt, np.nan)
        self.tpot = np.full(nt, np.nan)
        self.t_done = np.full(nt, np.nan)
        last = np.zeros(nt, dtype=bool)
        ends = np.asarray(trace.offsets[1:], dtype=np.int64)
        last[ends[ends > np.asarray(trace.offsets[:-1])] - 1] = True
        # Per turn, as Python lists (element access is ~3x cheaper than on arrays): tokens hit
        # in storage (whole blocks), tokens to prefill (the rest of the context and the append),
        # tokens generated, think time, and whether it is the agent's last turn.
        hit, new = turn_tokens(trace, m)
        self.hit_l = hit.tolist()
        self.new_l = new.tolist()
        self.gen_l = trace.generated.tolist()
        self.think_s = trace.think_s.tolist()
        self.last_turn = last.tolist()
        self.queue: deque = deque()
        self.heap: list = []
        self.seq = 0
        self.now = 0.0
        self.events = 0
        self.done_turns = 0

    # ---- event engine --------------------------------------------------------------------
    def at(self, t: float, fn, arg) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, arg))

    def run(self) -> "Simulation":
        off = self.trace.offsets
        for a in range(self.trace.num_agents):
            if off[a + 1] > off[a]:
                self.at(float(self.start_s[a]), self._arrive, int(off[a]))
        heap, pop = self.heap, heapq.heappop
        n = 0
        while heap:
            t, _, fn, arg = pop(heap)
            self.now = t
            fn(arg)
            n += 1
            if self.progress is not None and not n & 0x3FFF:
                self.progress(self.done_turns)
        self.events = n
        if self.progress is not None:
            self.progress(self.done_turns)
        if self.done_turns < self.trace.num_turns:
            raise RuntimeError(self._stall_reason())
        return self

    def _stall_reason(self) -> str:
        left = self.trace.num_turns - self.done_turns
        why = []
        if self.queue:
            need = self.queue[0].hbm
            if need > self.m.hbm_kv_bytes:
                why.append(f"the head request needs {need / 1e9:.3g} GB of decode HBM, more than a decode "
                           f"engine has for KV ({self.m.hbm_kv_bytes / 1e9:.3g} GB)")
            else:
                why.append(f"{len(self.queue)} requests could not be placed")
        waits = sum(len(w) for w in self.dram_wait)
        if waits:
            why.append(f"{waits} reads wait for host DRAM")
        return f"simulation stalled with {left} turns unfinished: " + ("; ".join(why) or "no pending event")

    # ---- arrivals and placement ----------------------------------------------------------
    def _arrive(self, row: int) -> None:
        hit, new, gen = self.hit_l[row], self.new_l[row], self.gen_l[row]
        bpt = self.bpt
        r = _Req(row, self.now, hit, hit, new, gen, bpt * (hit + new + gen), bpt * hit)
        self.t_arrive[row] = self.now
        was_empty = not self.queue
        self.queue.append(r)
        if was_empty:
            self._schedule(_ARRIVAL)

    def _short_changed(self, node: int) -> None:
        """Recompute when `node`'s read queue falls to alpha tokens (it drains at the NIC's
        rate): read_q(t) = max(read_free - t, 0) * bw + wait_tok <= alpha from short_at on."""
        slack = self.params.alpha_tokens - self.wait_tok[node]
        self.short_at[node] = self.read_free[node] - slack / self.read_bw_tok if slack >= 0 else math.inf

    def _read_q(self, node: int) -> float:
        """Tokens not yet read by `node`'s storage NIC: its FIFO backlog plus reads waiting
        for DRAM."""
        return max(self.read_free[node] - self.now, 0.0) * self.read_bw_tok + self.wait_tok[node]

    def _schedule(self, freed: int) -> None:
        """Place queued requests in FIFO order until the head cannot be placed. `freed` says
        what just changed (_ARRIVAL, _PE_FREED, _DE_FREED): a head blocked on the other kind
        of engine cannot move, so the attempt is skipped."""
        if self.blocked and freed != _ARRIVAL and freed != self.blocked:
            return
        pol, p, q = self.pol, self.params, self.queue
        g = self.g
        self.blocked = 0
        while q:
            r = q[0]
            if pol.scheduler:
                now = self.now
                short = [now >= t for t in self.short_at[:self.P]]
                pe = sched.pick_prefill_engine_by_node(self.node_min_tok, self.node_min_idx, short, p)
            else:
                beta = p.beta_tokens
                pe = self.pe_rr.pick(np.fromiter((t <= beta for t in self.pe_tok), bool, len(self.pe_tok)),
                                     commit=False)  # the turn passes only if a DE is found too
            if pe < 0:
                self.blocked = _PE_FREED
                return
            if pol.scheduler:
                grp = sched.pick_decode_group(self.group_tok, self.group_hbm, r.hbm)
                de = -1
                if grp >= 0:
                    s = slice(grp * g, (grp + 1) * g)
                    de = sched.pick_decode_engine(self.de_tok[s], self.de_seq[s], self.de_hbm[s], r.final, r.hbm,
                                                  r.final, p)
                    de = grp * g + de if de >= 0 else -1
            else:
                need = r.hbm
                de = self.de_rr.pick(np.fromiter((h >= need for h in self.de_hbm), bool, len(self.de_hbm)))
            if de < 0:
                self.blocked = _DE_FREED
                return
            q.popleft()
            if not pol.scheduler:
                self.pe_rr.commit(pe)
            if not pol.dual_path:
                side = sched.READ_PE
            elif pol.scheduler:
                side = sched.pick_read_side(self._read_q(pe // g), self._read_q(self.P + de // g))
            else:
                side = self.side_rr
                self.side_rr ^= 1
            r.pe, r.de, r.side = pe, de, side
            self._pe_add(pe, r.new)
            self.pe_seq[pe] += 1
            self.de_tok[de] += r.final
            self.de_seq[de] += 1
            self.de_hbm[de] -= r.hbm
            self._de_changed(de, r.final)
            if pol.layerwise or pol.free_io:
                self._read(r)   # prefetch: reads run ahead of the engine's batches
            else:
                r.sync = True   # loaded when its batch forms (below)
                self._ready(r)

    def _pe_add(self, pe: int, d_tok: float) -> None:
        tok, g = self.pe_tok, self.g
        tok[pe] += d_tok
        n = pe // g
        lo = n * g
        node = tok[lo:lo + g]
        i = node.index(min(node))
        self.node_min_tok[n] = node[i]
        self.node_min_idx[n] = lo + i

    def _de_changed(self, de: int, d_tok: float) -> None:
        grp = de // self.g
        self.group_tok[grp] += d_tok
        self.group_hbm[grp] = max(self.de_hbm[grp * self.g:(grp + 1) * self.g])

    # ---- storage reads -------------------------------------------------------------------
    def _read(self, r: _Req) -> None:
        if r.hit == 0 or self.pol.free_io:
            self._ready(r)
            return
        node = r.pe // self.g if r.side == sched.READ_PE else self.P + r.de // self.g
        w = self.dram_wait[node]
        if w or (self.dram_used[node] + r.hit_bytes > self.cfg.cluster.dram_bytes and self.dram_used[node] > 0):
            w.append(r)
            self.wait_tok[node] += r.hit
            self._short_changed(node)
            return
        self._start_read(node, r)

    def _start_read(self, node: int, r: _Req) -> None:
        self.dram_used[node] += r.hit_bytes
        t0 = max(self.now, self.read_free[node])
        t1 = t0 + r.hit_bytes / self.cfg.cluster.snic_read_Bps
        self.read_free[node] = t1
        self._short_changed(node)
        self.read_bytes[node] += r.hit_bytes
        self.snic_busy.add(node, t0, t1)
        self.at(t1, self._sync_read_done if r.sync else self._ready, r)

    def _release_dram(self, node: int, nbytes: float) -> None:
        self.dram_used[node] -= nbytes
        w, cap = self.dram_wait[node], self.cfg.cluster.dram_bytes
        while w and (self.dram_used[node] + w[0].hit_bytes <= cap or self.dram_used[node] <= 0):
            r = w.popleft()
            self.wait_tok[node] -= r.hit
            self._start_read(node, r)

    # ---- prefill -------------------------------------------------------------------------
    def _ready(self, r: _Req) -> None:
        self.pe_ready[r.pe].append(r)
        if not self.pe_busy[r.pe]:
            self._start_batch(r.pe)

    def _start_batch(self, pe: int) -> None:
        ready = self.pe_ready[pe]
        if not ready:
            return
        m, pol = self.m, self.pol
        items = []  # (req, new tokens computed in this batch)
        if pol.scheduler:
            n_whole, chunk = sched.build_prefill_batch((x.left for x in ready), (x.ctx for x in ready),
                                                       m.attention_s, self.params.quota_s)
            items = [(x, x.left) for x in islice(ready, n_whole)]
            if chunk:
                items.append((ready[n_whole], chunk))
        else:
            budget, hbm = self.cfg.basic_batch_tokens, m.hbm_kv_bytes
            toks, kv = 0, 0.0
            for x in ready:
                need = m.kv_bytes(x.ctx + x.left)
                if items and (toks + x.left > budget or (not pol.layerwise and kv + need > hbm)):
                    break
                items.append((x, x.left))
                toks += x.left
                kv += need
        # Whole requests leave `ready`; a chunked one stays at its head for the next batch.
        for _ in range(sum(1 for x, k in items if k == x.left)):
            ready.popleft()
        compute = m.batch_overhead_s
        bin_ = bout = 0.0
        for x, k in items:
            compute += m.prefill_s(k, x.ctx)
            bin_ += m.kv_bytes(x.ctx)
            first = x.left == x.new
            bout += m.kv_bytes(k + (x.hit if (first and x.side == sched.READ_PE) else 0))
        if pol.free_io:
            dur = compute
        elif pol.layerwise:
            dur = max(compute, bin_ / self.B, bout / self.B) + compute / m.kv.num_layers
        else:
            dur = bin_ / self.B + compute + bout / self.B
        self.pe_busy[pe] = True
        if not pol.layerwise and not pol.free_io:
            # Without layerwise prefill the forward pass waits for the whole batch's KV (as a
            # blocking, non-layerwise retrieve does): the reads start now, the GPU idles.
            loads = [x for x, k in items if x.hit and x.left == x.new]
            if loads:
                self.pe_wait[pe] = [len(loads), items, dur]
                for x in loads:
                    self._read(x)
                return
        self.pe_gpu_busy.add(pe, self.now, self.now + dur)
        self.at(self.now + dur, self._end_batch, (pe, items))

    def _sync_read_done(self, r: _Req) -> None:
        # Without layerwise prefill the KV goes on to HBM whole, so its host DRAM is free once
        # the read lands (holding it until the whole batch has loaded could deadlock a batch
        # whose loads do not fit in DRAM together).
        r.sync = False
        self._release_dram(r.pe // self.g, r.hit_bytes)
        w = self.pe_wait[r.pe]
        w[0] -= 1
        if w[0] == 0:
            _, items, dur = w
            self.pe_gpu_busy.add(r.pe, self.now, self.now + dur)
            self.at(self.now + dur, self._end_batch, (r.pe, items))

    def _end_batch(self, arg) -> None:
        pe, items = arg
        m, now = self.m, self.now
        for x, k in items:
            x.left -= k
            x.ctx += k
            self._pe_add(pe, -k)
            if x.left:
                continue
            self.pe_seq[pe] -= 1
            x.t_first = now
            self.t_first[x.row] = now
            if x.side == sched.READ_PE and x.hit and self.pol.layerwise and not self.pol.free_io:
                self._release_dram(pe // self.g, x.hit_bytes)
            # DE host buffer -> DE HBM at decode start (the PD transfer itself streamed under
            # the batch above).
            delay = 0.0 if self.pol.free_io else m.kv_bytes(x.ctx) / self.B
            self.at(now + delay, self._decode_start, x)
        self.pe_busy[pe] = False
        self._start_batch(pe)
        self._schedule(_PE_FREED)  # every batch computes tokens, so the PE's load fell

    # ---- decode --------------------------------------------------------------------------
    def _advance(self, de: int) -> None:
        st = self.de_step_s[de]
        if st > 0:
            self.de_steps[de] += (self.now - self.de_tlast[de]) / st
        self.de_tlast[de] = self.now

    def _restep(self, de: int) -> None:
        """Re-evaluate the step time after a change and schedule the next completion."""
        n = self.de_n[de]
        st = self.m.decode_step_s(n, self.de_ctx[de])
        self.de_step_s[de] = st
        h = self.de_heap[de]
        if not h:
            self.de_ver[de] += 1        # drops the pending tick, if any
            self.de_next[de] = math.inf
            return
        t = self.now + max(h[0][0] - self.de_steps[de], 0.0) * st
        # A tick already pending no later than t stays: it re-evaluates when it fires. This
        # keeps one heap entry per DE while sequences join (each join only delays completions).
        if self.de_next[de] <= t:
            return
        self.de_ver[de] += 1
        self.de_next[de] = t
        self.at(t, self._decode_tick, (de, self.de_ver[de]))

    def _decode_start(self, r: _Req) -> None:
        de = r.de
        if r.side == sched.READ_DE and r.hit and not self.pol.free_io:
            self._release_dram(self.P + de // self.g, r.hit_bytes)
        self._advance(de)
        if self.de_n[de] == 0:
            self.de_since[de] = self.now
        self.de_n[de] += 1
        self.de_ctx[de] += r.ctx + r.gen / 2
        r.t_dec = self.now
        # The first token came from prefill; gen - 1 decode steps remain.
        heapq.heappush(self.de_heap[de], (self.de_steps[de] + max(r.gen - 1, 0), r.row, r))
        self._restep(de)
        self.t_second[r.row] = self.now + self.de_step_s[de] if r.gen > 1 else np.nan

    def _decode_tick(self, arg) -> None:
        de, ver = arg
        if ver != self.de_ver[de]:
            return
        self.de_next[de] = math.inf
        self._advance(de)
        h, done = self.de_heap[de], []
        while h and h[0][0] <= self.de_steps[de] + 1e-9:
            done.append(heapq.heappop(h)[2])
        for r in done:
            self.de_n[de] -= 1
            self.de_ctx[de] -= r.ctx + r.gen / 2
            self.de_hbm[de] += r.hbm
            self.de_tok[de] -= r.final
            self._de_changed(de, -r.final)
            self.de_seq[de] -= 1
            if r.gen > 1:
                self.tpot[r.row] = (self.now - r.t_dec) / (r.gen - 1)
            self._persist(r)
        if self.de_n[de] == 0:
            self.de_ctx[de] = 0.0
            self.de_gpu_busy.add(de, self.de_since[de], self.now)
        self._restep(de)
        if done:
            self._schedule(_DE_FREED)

    # ---- persistence and the next turn ---------------------------------------------------
    def _persist(self, r: _Req) -> None:
        m = self.m
        new_blocks = m.stored_tokens(r.final) - r.hit
        t = self.now
        if new_blocks > 0 and not self.pol.free_io:
            node = self.P + r.de // self.g
            t0 = max(t, self.write_free[node])
            t = t0 + m.kv_bytes(new_blocks) / self.cfg.cluster.snic_write_Bps
            self.write_free[node] = t
        # The turn ends when its blocks are durable; the next turn can then hit them.
        self.t_done[r.row] = t
        self.done_turns += 1
        if not self.last_turn[r.row]:
            self.at(t + self.think_s[r.row], self._arrive, r.row + 1)


def simulate(cfg: SimConfig, trace, start_s=None, progress=None) -> Simulation:
    """Build and run one simulation; returns it with its per-turn arrays filled."""
    return Simulation(cfg, trace, start_s, progress).run()
