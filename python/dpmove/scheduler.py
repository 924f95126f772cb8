"""DualPath scheduling policy (DUALPATH.md section 6): which prefill engine (PE) and decode
engine (DE) take a request, which side reads its cached KV, and how a PE builds its batch.

This module is policy only: it reads load reports and returns indices. The simulator
(``dpmove.sim``) and the reference runtime both call it; neither keeps a copy of the logic.

Load reports are NumPy arrays indexed by engine (or node):

- ``tok``     float64 [E]  tokens of the engine's unfinished requests (PE: tokens still to
                           compute; DE: context tokens of the requests it holds)
- ``seq``     int64   [E]  number of unfinished requests on the engine
- ``node``    int64   [E]  node index of each engine
- ``read_q``  float64 [N]  tokens queued for each node's storage NIC (not yet read)
- ``hbm_free``float64 [E]  bytes of HBM a DE can still give to KV

Units: tokens and bytes; times in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Tuple

import numpy as np

__all__ = [
    "SchedulerParams", "POLICIES", "Policy", "get_policy",
    "pick_prefill_engine", "pick_prefill_engine_by_node", "pick_decode_group", "pick_decode_engine", "pick_read_side",
    "RoundRobin", "build_prefill_batch", "READ_PE", "READ_DE",
]

READ_PE = 0  # the PE node's storage NIC reads (PE-read path)
READ_DE = 1  # the DE node's storage NIC reads, then RDMA to the PE (DE-read path)


@dataclass(frozen=True)
class SchedulerParams:
    """Thresholds of section 6, in tokens, profiled per deployment.

    alpha_tokens: tokens one node's storage NIC reads in 3 s.
    beta_tokens:  tokens one PE GPU computes in 5 s; PEs holding more get no new request.
    z_slack:      the 1.05 in Z = 1.05 x (sum len over R + sum tok_e) / |E|.
    quota_s:      predicted attention time one PE batch may reach (300 ms).
    """

    alpha_tokens: float
    beta_tokens: float
    z_slack: float = 1.05
    quota_s: float = 0.3

    def __post_init__(self) -> None:
        if not (self.alpha_tokens > 0 and self.beta_tokens > 0):
            raise ValueError(f"alpha_tokens and beta_tokens must be > 0, got {self.alpha_tokens}, {self.beta_tokens}")
        if not self.z_slack >= 1.0:
            raise ValueError(f"z_slack must be >= 1, got {self.z_slack}")
        if not self.quota_s > 0:
            raise ValueError(f"quota_s must be > 0, got {self.quota_s}")


@dataclass(frozen=True)
class Policy:
    """What a serving policy turns on. Basic has none of it; DualPath all of it; Oracle is
    DualPath with every byte moved for free (a simulator-only notion)."""

    name: str
    layerwise: bool     # stream Layer Blocks under compute; else load all KV, compute, send
    dual_path: bool     # DE-read path allowed
    scheduler: bool     # section-6 placement, read-side choice and quota batches; else round robin
    free_io: bool = False


POLICIES = {
    p.name: p
    for p in (
        Policy("basic", layerwise=False, dual_path=False, scheduler=False),
        Policy("layerwise", layerwise=True, dual_path=False, scheduler=False),
        Policy("dualpath-nosched", layerwise=True, dual_path=True, scheduler=False),
        Policy("dualpath", layerwise=True, dual_path=True, scheduler=True),
        Policy("oracle", layerwise=True, dual_path=True, scheduler=True, free_io=True),
    )
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: expected one of {list(POLICIES)}")
    return POLICIES[name]


def pick_prefill_engine(tok: np.ndarray, node: np.ndarray, read_q: np.ndarray,
                        params: SchedulerParams) -> int:
    """PE for the request at the head of the global FIFO, or -1 (stop fetching).

    PEs with tok > beta are skipped. Among the rest, prefer those whose node's read queue is
    at most alpha (that keeps every storage NIC busy), then the others; within a class, the
    minimum tok (first index on ties)."""
    ok = tok <= params.beta_tokens
    if not ok.any():
        return -1
    short = ok & (read_q <= params.alpha_tokens)[node]
    cand = short if short.any() else ok
    return int(np.argmin(np.where(cand, tok, np.inf)))


def pick_prefill_engine_by_node(node_min_tok: Sequence[float], node_min_idx: Sequence[int],
                                node_short: Sequence[bool], params: SchedulerParams) -> int:
    """pick_prefill_engine from per-node summaries, at O(nodes) instead of O(engines).

    node_min_tok [N]: tokens of each node's least-loaded PE; node_min_idx [N]: its engine
    index (lowest on ties; indices grow with the node); node_short [N]: whether the node's read
    queue is at most alpha tokens. The same choice as pick_prefill_engine: the minimum over a
    class of engines is the minimum over its nodes' minima. A plain loop: node counts are small
    (tens) and this runs once per placed request."""
    beta = params.beta_tokens
    best_short = best_long = -1
    tok_short = tok_long = math.inf
    for n, t in enumerate(node_min_tok):
        if t > beta:
            continue
        if node_short[n]:
            if t < tok_short:
                tok_short, best_short = t, n
        elif t < tok_long:
            tok_long, best_long = t, n
    n = best_short if best_short >= 0 else best_long
    return int(node_min_idx[n]) if n >= 0 else -1


def pick_decode_group(group_tok: Sequence[float], group_hbm: Sequence[float], req_hbm: float) -> int:
    """Across DE groups: the group with the least total tokens (`group_tok` [G]; lowest index on
    ties) among those with a DE that can hold `req_hbm` bytes (`group_hbm` [G]: the most HBM any
    DE of the group has free); -1 when none can."""
    tok = group_tok.tolist() if isinstance(group_tok, np.ndarray) else group_tok
    hbm = group_hbm.tolist() if isinstance(group_hbm, np.ndarray) else group_hbm
    if not tok:
        return -1
    # Usually HBM does not bind: the least-loaded group overall is the answer.
    g = tok.index(min(tok))
    if hbm[g] >= req_hbm:
        return g
    best, best_tok = -1, math.inf
    for i, (t, h) in enumerate(zip(tok, hbm)):
        if h >= req_hbm and t < best_tok:
            best, best_tok = i, t
    return best


def pick_decode_engine(tok: Sequence[float], seq: Sequence[int], hbm_free: Sequence[float],
                       req_tokens: float, req_hbm: float, pending_tokens: float,
                       params: SchedulerParams) -> int:
    """Within one DE group (arrays over its engines): the DE for a request of `req_tokens`
    context tokens needing `req_hbm` bytes of HBM, or -1 when no DE has the HBM.

    Z = z_slack x (pending_tokens + sum tok) / |E|, where pending_tokens is the sum of len over
    the requests this fetch can place (R, at least this request; the simulator places requests
    one at a time and passes this request's len alone). Prefer DEs with enough HBM and
    tok + len <= Z, taking the minimum seq among them; else the minimum tok with enough HBM."""
    # Groups are one node's engines (8 or so): plain loops beat NumPy's per-call overhead.
    tok_l, seq_l, hbm_l = (x.tolist() if isinstance(x, np.ndarray) else x for x in (tok, seq, hbm_free))
    if not tok_l:
        return -1
    z = params.z_slack * (pending_tokens + sum(tok_l)) / len(tok_l)
    best_under = best_any = -1
    for i, (t, h) in enumerate(zip(tok_l, hbm_l)):
        if h < req_hbm:
            continue
        if t + req_tokens <= z and (best_under < 0 or seq_l[i] < seq_l[best_under]):
            best_under = i
        if best_any < 0 or t < tok_l[best_any]:
            best_any = i
    return best_under if best_under >= 0 else best_any


def pick_read_side(read_q_pe_node: float, read_q_de_node: float) -> int:
    """READ_DE when the DE node's storage read queue is shorter, else READ_PE (ties stay local)."""
    return READ_DE if read_q_de_node < read_q_pe_node else READ_PE


class RoundRobin:
    """Placement without the scheduler: the next candidate in turn that passes `ok`."""

    def __init__(self, n: int) -> None:
        if n <= 0:
            raise ValueError(f"RoundRobin needs n > 0, got {n}")
        self.n = n
        self.next = 0

    def pick(self, ok: np.ndarray, commit: bool = True) -> int:
        """Index of the next True in `ok` (bool [n]) at or after the cursor, or -1. With
        commit=False the cursor stays (a placement that may still fail elsewhere); call
        commit(i) once it holds."""
        if len(ok) != self.n:
            raise ValueError(f"expected {self.n} flags, got {len(ok)}")
        order = np.concatenate([ok[self.next:], ok[:self.next]])
        hit = np.flatnonzero(order)
        if hit.size == 0:
            return -1
        i = (self.next + int(hit[0])) % self.n
        if commit:
            self.commit(i)
        return i

    def commit(self, i: int) -> None:
        """Candidate i was taken: the turn passes to the one after it."""
        self.next = (i + 1) % self.n


def build_prefill_batch(new: Iterable[int], ctx: Iterable[int], attention_s: Callable[[float, float], float],
                        quota_s: float) -> Tuple[int, int]:
    """FIFO batch under the attention-time quota.

    new[i], ctx[i]: new and cached tokens of the i-th ready request in FIFO order (any
    iterables; read only as far as the batch reaches, so a queue can be passed lazily). Returns
    (n_whole, chunk): the first n_whole requests go whole; then, when chunk > 0, the next
    request contributes only its first `chunk` new tokens (the largest count that keeps the
    batch within quota, found by binary search). A batch always makes progress: when even
    one token of the head request overflows, that token goes alone."""
    used = 0.0
    count = 0
    for i, (n, c) in enumerate(zip(new, ctx)):
        count = i + 1
        t = attention_s(n, c)
        if used + t <= quota_s:
            used += t
            continue
        lo, hi = 0, int(n) - 1  # largest k in [0, n-1] with attention_s(k, c) <= quota - used
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if used + attention_s(mid, c) <= quota_s:
                lo = mid
            else:
                hi = mid - 1
        if i == 0 and lo == 0:
            return 0, 1
        return i, lo
    return count, 0
