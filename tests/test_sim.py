"""Specification tests for the discrete-event cluster model (dpmove.sim.cluster), its
experiments (dpmove.sim.experiments) and the ``dpmove sim`` command line.

1. A single request through an idle 1P1D cluster, timed by hand from the model constants
   and the rules in the cluster.py module docstring, for every policy; the simulation must
   match to 1e-9 relative.
2. Invariants of a generated workload: every turn ends, times are ordered, turns chain,
   every whole-block hit byte is read exactly once through an allowed storage NIC, the
   engines are empty afterwards.
3. Lower bounds (section 7 bound helpers) hold; oracle <= dualpath; dualpath beats basic
   when storage-bound.
4. Tiny host DRAM cannot deadlock; a request larger than any DE's HBM raises.
5. Determinism. 6. Online runs and the SLO-rate search. 7. Result dict shape and run_many.
8. The CLI. 9. validate() end to end at toy size.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from dpmove import cli
from dpmove import scheduler as sched
from dpmove.sim import experiments as ex
from dpmove.sim.cluster import SimConfig, Simulation, simulate
from dpmove.sim.hardware import ClusterSpec, ComputeModel, get_compute_model
from dpmove.sim.trace import DatasetStats, Trace, generate

POLICIES = list(sched.POLICIES)
M660 = get_compute_model("ds-660b")
C11 = ClusterSpec(p_nodes=1, d_nodes=1)
REL = 1e-9


def run_sim(trace: Trace, policy: str, cluster: ClusterSpec = C11, model: ComputeModel = M660,
            start_s=None) -> Simulation:
    return simulate(SimConfig(cluster=cluster, model=model, policy=sched.get_policy(policy)), trace, start_s)


def close(got: float, want: float, rel: float = REL) -> bool:
    return math.isclose(got, want, rel_tol=rel, abs_tol=1e-12)


# --------------------------------------------------------------------------------------------
# 1. Hand-computed single requests
# --------------------------------------------------------------------------------------------

class Hand:
    """One turn on an idle cluster, timed from the docstring rules.

    side: "pe" (PE-read: the PE sends hit + new KV to the DE) or "de" (DE-read: only the new
    tokens' KV goes back). Times are relative to the arrival."""

    def __init__(self, policy: str, context: int, append: int, gen: int, side: str = "pe",
                 model: ComputeModel = M660, cluster: ClusterSpec = C11) -> None:
        m, c, pol = model, cluster, sched.get_policy(policy)
        bt, bpt, B = m.kv.block_tokens, m.bytes_per_token, c.cnic_Bps
        self.hit = hit = (context // bt) * bt
        self.new = new = context - hit + append       # the non-block tail is recomputed
        compute = m.batch_overhead_s + m.prefill_s(new, hit)
        b_in = hit * bpt                               # prefix KV into the PE's HBM
        b_out = (new + (hit if side == "pe" else 0)) * bpt  # PE -> DE buffer
        if pol.free_io:
            read, batch, to_hbm, write = 0.0, compute, 0.0, 0.0
        else:
            read = hit * bpt / c.snic_read_Bps
            if pol.layerwise:
                batch = max(compute, b_in / B, b_out / B) + compute / m.kv.num_layers
            else:
                batch = b_in / B + compute + b_out / B
            to_hbm = (hit + new) * bpt / B                 # DE buffer -> DE HBM before decode
            write = (m.stored_tokens(hit + new + gen) - hit) * bpt / c.snic_write_Bps
        # Decode of one sequence: its context is the prompt plus, on average, half of what it
        # generates (the engine's sum(ctx) uses ctx + gen / 2 per sequence).
        self.step = m.decode_step_s(1, hit + new + gen / 2)
        self.ttft = read + batch
        self.dec_start = self.ttft + to_hbm
        self.dec_end = self.dec_start + (gen - 1) * self.step
        self.done = self.dec_end + write
        self.read_bytes = 0.0 if pol.free_io else float(hit * bpt)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("context", [64 * 100, 64 * 100 + 37, 50, 0])
def test_single_request_by_hand(policy: str, context: int) -> None:
    app, gen = 300, 10
    tr = Trace([0, 1], [app], [gen], context=[context])
    sim = run_sim(tr, policy)
    h = Hand(policy, context, app, gen)
    assert h.hit + h.new == context + app
    assert sim.t_arrive[0] == 0.0
    assert close(sim.t_first[0], h.ttft), (sim.t_first[0], h.ttft)
    assert close(sim.t_second[0], h.dec_start + h.step), (sim.t_second[0], h.dec_start + h.step)
    assert close(sim.tpot[0], h.step)
    assert close(sim.t_done[0], h.done), (sim.t_done[0], h.done)
    # Only whole blocks are read, and only on the PE node (the tie goes to the local side).
    assert sim.read_bytes.tolist() == [h.read_bytes, 0.0]


@pytest.mark.parametrize("policy", POLICIES)
def test_single_request_decode_window(policy: str) -> None:
    """TPOT * (gen - 1) is the decode window; it starts after the DE buffer -> HBM copy."""
    tr = Trace([0, 1], [300], [10], context=[64 * 100])
    sim = run_sim(tr, policy)
    h = Hand(policy, 64 * 100, 300, 10)
    dec_start = sim.t_second[0] - sim.tpot[0]
    assert close(dec_start, h.dec_start)
    assert close(dec_start + 9 * sim.tpot[0], h.dec_end)
    bpt = M660.bytes_per_token
    if policy != "oracle":
        assert close(dec_start - sim.t_first[0], (6400 + 300) * bpt / C11.cnic_Bps)
        # 6710 final tokens -> 6656 stored; 256 of them new, written at snic_write_Bps.
        assert close(sim.t_done[0] - h.dec_end, 256 * bpt / C11.snic_write_Bps)
    else:
        assert sim.t_first[0] == dec_start and close(sim.t_done[0], h.dec_end)


@pytest.mark.parametrize("policy", POLICIES)
def test_two_turns_by_hand(policy: str) -> None:
    """The second turn arrives when the first's new blocks are durable plus the think time;
    it hits exactly the blocks stored so far (6710 tokens -> 6656) and recomputes the rest.
    dualpath-nosched alternates sides, so its second read goes through the DE node."""
    tr = Trace([0, 2], [300, 100], [10, 20], context=[6400, 6710], think_s=[1.5, 0.0])
    sim = run_sim(tr, policy)
    a = Hand(policy, 6400, 300, 10)
    b = Hand(policy, 6710, 100, 20, "de" if policy == "dualpath-nosched" else "pe")
    assert b.hit == 6656 and b.new == 154
    t1 = a.done + 1.5
    assert close(sim.t_arrive[1], t1)
    assert close(sim.t_first[1], t1 + b.ttft) and close(sim.t_done[1], t1 + b.done)
    assert close(sim.tpot[1], b.step)
    side = 1 if policy == "dualpath-nosched" else 0
    want = [a.read_bytes, 0.0]
    want[side] += b.read_bytes
    assert sim.read_bytes.tolist() == want


def test_single_token_generation_has_no_decode_steps() -> None:
    tr = Trace([0, 1], [300], [1], context=[6400])
    sim = run_sim(tr, "dualpath")
    h = Hand("dualpath", 6400, 300, 1)
    assert close(sim.t_done[0], h.done)
    assert np.isnan(sim.tpot[0]) and np.isnan(sim.t_second[0])


def test_de_read_by_hand_nosched_round_robin() -> None:
    """dualpath-nosched alternates sides: the second request (arriving on an idle cluster
    after the first is done) reads through its DE node and the PE returns only new KV."""
    ctx, app, gen = 64 * 100 + 5, 300, 10
    tr = Trace([0, 1, 2], [app, app], [gen, gen], context=[ctx, ctx])
    sim = run_sim(tr, "dualpath-nosched", start_s=np.array([0.0, 100.0]))
    pe, de = Hand("dualpath-nosched", ctx, app, gen, "pe"), Hand("dualpath-nosched", ctx, app, gen, "de")
    assert close(sim.t_first[0], pe.ttft) and close(sim.t_done[0], pe.done)
    assert close(sim.t_first[1], 100.0 + de.ttft) and close(sim.t_done[1], 100.0 + de.done)
    # New KV only is smaller than hit + new, so the batch can only be faster.
    assert de.ttft <= pe.ttft
    assert sim.read_bytes.tolist() == [pe.read_bytes, de.read_bytes]


def test_dualpath_reads_on_de_side_when_pe_queue_longer() -> None:
    """Two requests at t=0: the first (long context) is read by the PE node (tie -> local);
    the second then sees a PE-node read backlog and an idle DE node, so it reads there; its
    timing is that of a lone DE-read request (another PE engine, another DE engine)."""
    big, small, app, gen = 64 * 900, 64 * 50, 200, 8
    tr = Trace([0, 1, 2], [app, app], [gen, gen], context=[big, small])
    sim = run_sim(tr, "dualpath")
    a, b = Hand("dualpath", big, app, gen, "pe"), Hand("dualpath", small, app, gen, "de")
    assert close(sim.t_first[0], a.ttft) and close(sim.t_first[1], b.ttft)
    assert close(sim.t_second[1] - sim.tpot[1], b.dec_start)
    assert sim.read_bytes.tolist() == [a.read_bytes, b.read_bytes]


@pytest.mark.parametrize("policy", ["dualpath", "oracle"])
def test_chunked_prefill_by_hand(policy: str) -> None:
    """An append whose attention time exceeds the 300 ms quota is prefilled in chunks; each
    chunk reloads the KV computed so far (bytes in), the first also sends the hit KV out."""
    m, c = M660, C11
    ctx, app, gen = 64 * 100, 6000, 4
    cfg = SimConfig(cluster=c, model=m, policy=sched.get_policy(policy))
    assert m.attention_s(app, ctx) > cfg.quota_s  # the premise: it must chunk
    sim = simulate(cfg, Trace([0, 1], [app], [gen], context=[ctx]))
    bpt, B, L = m.bytes_per_token, c.cnic_Bps, m.kv.num_layers
    t = 0.0 if policy == "oracle" else ctx * bpt / c.snic_read_Bps
    left, cur, first, chunks = app, ctx, True, 0
    while left:
        n_whole, k = sched.build_prefill_batch([left], [cur], m.attention_s, cfg.quota_s)
        k = left if n_whole else k
        assert 0 < k <= left
        compute = m.batch_overhead_s + m.prefill_s(k, cur)
        if policy == "oracle":
            t += compute
        else:
            t += max(compute, cur * bpt / B, (k + (ctx if first else 0)) * bpt / B) + compute / L
        left, cur, first, chunks = left - k, cur + k, False, chunks + 1
    assert chunks >= 2
    assert close(sim.t_first[0], t), (sim.t_first[0], t)


def test_basic_batch_loads_on_critical_path_by_hand() -> None:
    """Basic on a 1-GPU PE: the first request runs alone; the two that arrive meanwhile form
    one batch whose reads start when the batch forms, back to back on the node's NIC, then
    bytes in / B + compute + bytes out / B."""
    m = M660
    c = ClusterSpec(p_nodes=1, d_nodes=1, gpus_per_node=1)
    ctx, app, gen = 64 * 40, 300, 2
    tr = Trace([0, 1, 2, 3], [app] * 3, [gen] * 3, context=[ctx] * 3)
    sim = run_sim(tr, "basic", cluster=c, start_s=np.array([0.0, 1e-3, 2e-3]))
    bpt, B = m.bytes_per_token, c.cnic_Bps
    read = ctx * bpt / c.snic_read_Bps
    one = m.batch_overhead_s + m.prefill_s(app, ctx)
    t1 = read + ctx * bpt / B + one + (ctx + app) * bpt / B
    assert close(sim.t_first[0], t1)
    assert t1 > 2e-3  # both others are ready when the first batch ends
    two = m.batch_overhead_s + 2 * m.prefill_s(app, ctx)
    t2 = t1 + 2 * read + 2 * ctx * bpt / B + two + 2 * (ctx + app) * bpt / B
    assert close(sim.t_first[1], t2) and close(sim.t_first[2], t2)


# --------------------------------------------------------------------------------------------
# 2. Invariants on generated workloads
# --------------------------------------------------------------------------------------------

SMALL = DatasetStats("small", 16384, turns=12, append=400, generated=120, total_tokens=10000,
                     avg_context=6000, first_prompt=3000, compact_tokens=1024)


def hit_bytes(tr: Trace, m: ComputeModel = M660) -> np.ndarray:
    bt = m.kv.block_tokens
    return (tr.context // bt * bt).astype(np.float64) * m.bytes_per_token


def check_invariants(sim: Simulation, tr: Trace, policy: str, m: ComputeModel = M660) -> None:
    pol = sched.get_policy(policy)
    c = sim.cfg.cluster
    assert np.isfinite(sim.t_done).all(), f"{np.isnan(sim.t_done).sum()} turns never finished"
    assert np.isfinite(sim.t_arrive).all() and np.isfinite(sim.t_first).all()
    assert (sim.t_arrive <= sim.t_first).all()
    assert (sim.t_first <= sim.t_done).all()
    two = tr.generated > 1
    assert (sim.t_second[two] >= sim.t_first[two]).all() and (sim.t_second[two] <= sim.t_done[two] + 1e-9).all()
    assert np.isnan(sim.t_second[~two]).all()
    assert (sim.tpot[two] >= m.step_base_s).all()
    # TTFT covers at least the request's own compute (plus one batch overhead).
    bt = m.kv.block_tokens
    hit = tr.context // bt * bt
    new = tr.context - hit + tr.append
    own = m.batch_overhead_s + new * (m.token_flops + m.pair_flops * (hit + new / 2)) / m.prefill_flops
    assert (sim.t_first - sim.t_arrive >= own * (1 - 1e-9)).all()
    # Turns chain: the next turn arrives when this one is durable plus the think time.
    for a in range(tr.num_agents):
        lo, hi = int(tr.offsets[a]), int(tr.offsets[a + 1])
        assert sim.t_arrive[lo] == sim.start_s[a]
        np.testing.assert_allclose(sim.t_arrive[lo + 1:hi], sim.t_done[lo:hi - 1] + tr.think_s[lo:hi - 1],
                                   rtol=1e-12, atol=0)
    # Every whole-block hit byte is read exactly once, through a NIC the policy may use.
    want = 0.0 if pol.free_io else float(hit_bytes(tr, m).sum())
    assert math.isclose(float(sim.read_bytes.sum()), want, rel_tol=1e-12)
    if not pol.dual_path or pol.free_io:
        assert (sim.read_bytes[c.p_nodes:] == 0).all()
    # The cluster is empty afterwards.
    assert max(abs(x) for x in sim.pe_tok) < 1e-6
    np.testing.assert_allclose(sim.de_hbm, m.hbm_kv_bytes, rtol=1e-12)
    np.testing.assert_allclose(sim.de_tok, 0.0, atol=1e-6)
    assert (sim.pe_seq == 0).all() and not any(sim.de_seq) and not any(sim.de_n)
    assert (np.abs(sim.dram_used) < 1e-3).all()
    assert not sim.queue and not any(sim.pe_ready) and not any(sim.dram_wait) and not any(sim.pe_busy)
    assert not any(sim.de_heap)
    assert sim.done_turns == tr.num_turns


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("pd,agents,dataset,think", [
    ((1, 1), 16, "64k", 0.0),
    ((1, 2), 24, SMALL, 2.0),
    ((2, 4), 48, SMALL, 0.0),
])
def test_invariants_generated(policy: str, pd, agents: int, dataset, think: float) -> None:
    tr = generate(dataset, agents, seed=11, think_s=think)
    sim = run_sim(tr, policy, cluster=ClusterSpec().with_nodes(*pd))
    check_invariants(sim, tr, policy)


@pytest.mark.parametrize("policy", POLICIES)
def test_invariants_staggered_starts_small_gpus(policy: str) -> None:
    """2 GPUs per node, agents starting at random times, turns with compaction."""
    tr = generate(SMALL, 20, seed=5, think_s=1.0)
    starts = np.random.default_rng(3).uniform(0, 30, tr.num_agents)
    sim = run_sim(tr, policy, cluster=ClusterSpec(p_nodes=2, d_nodes=2, gpus_per_node=2), start_s=starts)
    check_invariants(sim, tr, policy)


# --------------------------------------------------------------------------------------------
# 3. Lower bounds and policy ordering
# --------------------------------------------------------------------------------------------

def long_context_trace(agents: int = 32, turns: int = 10) -> Trace:
    """Storage-bound: every turn re-reads ~60K cached tokens, computes 64 new ones and
    generates 2 (so neither prefill nor decode hides the reads)."""
    off = np.arange(agents + 1) * turns
    n = agents * turns
    app, gen = np.full(n, 64), np.full(n, 2)
    ctx = np.zeros(n, np.int64)
    for a in range(agents):
        ctx[a * turns:(a + 1) * turns] = 60000 + 66 * np.arange(turns)
    return Trace(off, app, gen, context=ctx)


@pytest.fixture(scope="module")
def offline_64k() -> Dict[str, dict]:
    tr = generate("64k", 64, seed=0)
    return {p: ex.run_offline(p_nodes=1, d_nodes=1, policy=p, trace=tr) for p in POLICIES}


@pytest.fixture(scope="module")
def offline_long() -> Dict[str, dict]:
    tr = long_context_trace()
    return {p: ex.run_offline(p_nodes=1, d_nodes=1, policy=p, trace=tr) for p in POLICIES}


@pytest.mark.parametrize("which", ["offline_64k", "offline_long"])
def test_lower_bounds(which: str, request) -> None:
    for pol, r in request.getfixturevalue(which).items():
        b = r["bounds"]
        assert r["jct_s"] >= b["io_bound_jct_s"] * (1 - 1e-9), pol
        assert r["jct_s"] >= b["compute_bound_jct_s"] * (1 - 1e-9), pol
        assert b["bound_jct_s"] == max(b["io_bound_jct_s"], b["compute_bound_jct_s"])
        if pol == "oracle":
            assert b["io_bound_jct_s"] == 0.0


def test_bounds_by_hand() -> None:
    tr = Trace([0, 2, 3], [300, 40, 500], [10, 10, 7], context=[6400 + 37, 6747, 0])
    c = ClusterSpec(p_nodes=2, d_nodes=3)
    m = M660
    hit = np.array([6400, 6720, 0])
    new = np.array([337, 67, 500])
    rb = float(hit.sum() * m.bytes_per_token)
    comp = float((new * (m.token_flops + m.pair_flops * (hit + new / 2))).sum()) / m.prefill_flops / 16
    for pol, readers in (("basic", 2), ("layerwise", 2), ("dualpath-nosched", 5), ("dualpath", 5)):
        b = ex.bounds(tr, m, c, sched.get_policy(pol))
        assert b["read_bytes"] == rb
        assert close(b["io_bound_jct_s"], rb / (readers * c.snic_read_Bps))
        assert close(b["compute_bound_jct_s"], comp)
        assert b["pd_ratio"] == 2 / 3
    b = ex.bounds(tr, m, c, sched.get_policy("oracle"))
    assert b["io_bound_jct_s"] == 0.0 and b["bound_jct_s"] == b["compute_bound_jct_s"]


@pytest.mark.parametrize("which", ["offline_64k", "offline_long"])
def test_oracle_not_slower_than_dualpath(which: str, request) -> None:
    r = request.getfixturevalue(which)
    assert r["oracle"]["jct_s"] <= r["dualpath"]["jct_s"] * 1.02


@pytest.mark.parametrize("which", ["offline_64k", "offline_long"])
def test_dualpath_beats_basic_when_storage_bound(which: str, request) -> None:
    r = request.getfixturevalue(which)
    assert r["dualpath"]["jct_s"] < r["basic"]["jct_s"]
    # DualPath spreads reads over both nodes' storage NICs; basic uses the PE node's only.
    assert r["basic"]["snic_read_bytes"][1] == 0.0
    assert r["dualpath"]["snic_read_bytes"][1] > 0.0


def test_long_context_trace_is_storage_bound(offline_long) -> None:
    """On the hand-built trace the PE NIC alone is the bottleneck: basic sits at its io bound
    and dualpath, with twice the NICs, gets close to half of it."""
    basic, dp = offline_long["basic"], offline_long["dualpath"]
    assert basic["bounds"]["io_bound_jct_s"] > 5 * basic["bounds"]["compute_bound_jct_s"]
    assert basic["jct_s"] < 1.05 * basic["bounds"]["io_bound_jct_s"]
    assert dp["jct_s"] < 1.05 * dp["bounds"]["io_bound_jct_s"]
    assert dp["jct_s"] < 0.55 * basic["jct_s"]


# --------------------------------------------------------------------------------------------
# 4. Resource limits
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_tiny_dram_generated_completes(policy: str) -> None:
    """Host DRAM just above the largest single read: reads queue for DRAM but all finish."""
    tr = generate("64k", 32, seed=1)
    dram = float(hit_bytes(tr).max()) * 1.01
    c = ClusterSpec(p_nodes=1, d_nodes=1, dram_bytes=dram)
    sim = run_sim(tr, policy, cluster=c)
    check_invariants(sim, tr, policy)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("gpus", [1, 2])
def test_tiny_dram_one_batch_two_loads(policy: str, gpus: int) -> None:
    """One PE engine, three same-size requests: the last two share a batch while DRAM holds
    only one request's hit KV. They must still finish (one after the other if need be)."""
    ctx, app, gen = 6400, 300, 10
    n = 3 * gpus
    tr = Trace(np.arange(n + 1), [app] * n, [gen] * n, context=[ctx] * n)
    c = ClusterSpec(p_nodes=1, d_nodes=1, gpus_per_node=gpus, dram_bytes=ctx * M660.bytes_per_token * 1.01)
    sim = run_sim(tr, policy, cluster=c)
    check_invariants(sim, tr, policy)


@pytest.mark.parametrize("policy", POLICIES)
def test_dram_smaller_than_one_read_completes(policy: str) -> None:
    """A read larger than the whole buffer still runs alone on an empty node."""
    tr = generate(SMALL, 8, seed=2)
    c = ClusterSpec(p_nodes=1, d_nodes=1, gpus_per_node=2, dram_bytes=1e6)
    sim = run_sim(tr, policy, cluster=c)
    check_invariants(sim, tr, policy)


@pytest.mark.parametrize("policy", POLICIES)
def test_request_larger_than_hbm_raises(policy: str) -> None:
    m = dataclasses.replace(M660, hbm_kv_bytes=1000.0 * M660.bytes_per_token)
    tr = Trace([0, 1, 2], [300, 300], [10, 10], context=[0, 6400])  # 310 tokens fit, 6710 do not
    with pytest.raises(RuntimeError, match="HBM"):
        run_sim(tr, policy, model=m)


# --------------------------------------------------------------------------------------------
# 5. Determinism
# --------------------------------------------------------------------------------------------

ARRAYS = ("t_arrive", "t_first", "t_second", "tpot", "t_done", "read_bytes")


@pytest.mark.parametrize("policy", POLICIES)
def test_deterministic(policy: str) -> None:
    c = ClusterSpec(p_nodes=1, d_nodes=2, gpus_per_node=4)
    a = run_sim(generate(SMALL, 16, seed=4, think_s=0.5), policy, cluster=c)
    b = run_sim(generate(SMALL, 16, seed=4, think_s=0.5), policy, cluster=c)
    for k in ARRAYS:
        assert np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True), k
    assert a.events == b.events


def test_different_seeds_differ() -> None:
    j = [ex.run_offline(p_nodes=1, d_nodes=1, policy="dualpath", agents=8, seed=s)["jct_s"] for s in (0, 1)]
    assert j[0] != j[1]


# --------------------------------------------------------------------------------------------
# 6. Online
# --------------------------------------------------------------------------------------------

def test_online_window(monkeypatch) -> None:
    sims: List[Simulation] = []

    class Rec(Simulation):
        def run(self):
            sims.append(self)
            return super().run()

    monkeypatch.setattr(ex, "Simulation", Rec)
    warm, dur = 50.0, 200.0
    r = ex.run_online(p_nodes=1, d_nodes=1, policy="dualpath", rate_aps=0.05, duration_s=dur, warmup_s=warm,
                      dataset="32k", seed=3)
    (sim,) = sims
    assert r["mode"] == "online" and r["jct_s"] is None and r["rate_aps"] == 0.05
    assert (sim.start_s < dur).all() and (np.diff(sim.start_s) > 0).all()
    check_invariants(sim, sim.trace, "dualpath")
    sel = (sim.t_arrive >= warm) & (sim.t_arrive < dur)
    # The test means something only if turns fall on both sides of the window.
    assert sel.any() and (sim.t_arrive < warm).any() and (sim.t_arrive >= dur).any()
    ttft = (sim.t_first - sim.t_arrive)[sel]
    assert r["latency_s"]["ttft"]["n"] == int(sel.sum())
    assert close(r["latency_s"]["ttft"]["mean"], float(ttft.mean()), 1e-12)
    assert close(r["latency_s"]["ttft"]["p90"], float(np.percentile(ttft, 90)), 1e-12)
    tpot = sim.tpot[sel]
    assert r["latency_s"]["tpot"]["n"] == int(np.isfinite(tpot).sum())
    assert close(r["latency_s"]["tpot"]["mean"], float(np.nanmean(tpot)), 1e-12)


@pytest.mark.parametrize("kw", [dict(rate_aps=0.0), dict(rate_aps=-1.0), dict(rate_aps=float("nan")),
                                dict(warmup_s=200.0, duration_s=200.0), dict(warmup_s=300.0, duration_s=200.0),
                                dict(warmup_s=-1.0)])
def test_online_bad_arguments(kw) -> None:
    args = dict(p_nodes=1, d_nodes=1, rate_aps=0.05, duration_s=200.0, warmup_s=50.0)
    args.update(kw)
    with pytest.raises(ValueError, match="rate_aps|warmup_s"):
        ex.run_online(**args)


def test_max_rate_zero_when_lo_misses() -> None:
    seen = []
    out = ex.max_rate("basic", lo=2.0, hi=4.0, iters=3, on_point=seen.append, p_nodes=1, d_nodes=1,
                      cluster=ClusterSpec(gpus_per_node=1), duration_s=20.0, warmup_s=5.0, dataset="32k")
    assert out["rate_aps"] == 0.0
    assert len(out["points"]) == 1 and seen == out["points"]
    assert out["points"][0]["rate_aps"] == 2.0 and out["points"][0]["slo_ok"] is False


def test_max_rate_returns_a_rate_that_met_the_slo() -> None:
    out = ex.max_rate("dualpath", lo=0.01, hi=0.5, iters=3, p_nodes=1, d_nodes=1, duration_s=200.0,
                      warmup_s=50.0, dataset="32k", seed=2)
    pts = out["points"]
    assert len(pts) >= 5  # lo, hi (doubled until it misses), then 3 bisection steps
    assert not pts[-4]["slo_ok"]  # the last upper bound tried before bisecting missed
    assert out["rate_aps"] > 0
    met = [p for p in pts if p["rate_aps"] == out["rate_aps"]]
    assert met and all(p["slo_ok"] for p in met)
    assert all(ex.meets_slo(p) == p["slo_ok"] for p in pts)
    # Bisection: no point that met the SLO is above the answer.
    assert all(p["rate_aps"] <= out["rate_aps"] for p in pts if p["slo_ok"])


# --------------------------------------------------------------------------------------------
# 7. Result dict shape and run_many
# --------------------------------------------------------------------------------------------

def test_result_shape(offline_64k) -> None:
    for pol, r in offline_64k.items():
        assert r["mode"] == "offline" and r["policy"] == pol and r["model"] == "ds-660b"
        assert (r["p_nodes"], r["d_nodes"], r["gpus_per_node"]) == (1, 1, 8)
        assert r["agents"] == 64 and r["turns"] > 64
        assert r["jct_s"] > 0 and r["rate_aps"] is None
        for k in ("ttft", "ttst", "tpot"):
            assert set(r["latency_s"][k]) == {"mean", "p50", "p90", "p99", "n"}
        lat = r["latency_s"]["ttft"]
        assert lat["n"] == r["turns"] and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        tl = r["timeline"]
        nb = math.ceil(r["jct_s"] / tl["bin_s"])
        assert len(tl["t_s"]) == nb == len(tl["pe_gpu_util"]) == len(tl["de_gpu_util"])
        su = np.array(tl["snic_util"])
        assert su.shape == (nb, 2)
        assert ((su >= 0) & (su <= 1)).all()
        assert all(0 <= x <= 1 for x in tl["pe_gpu_util"] + tl["de_gpu_util"])
        assert len(r["snic_read_bytes"]) == 2 and r["snic_balance"] >= 1.0
        assert 0 < r["pe_gpu_busy"] <= 1 and 0 < r["de_gpu_busy"] <= 1
        assert set(r["bounds"]) >= {"pd_ratio", "pd_min", "pd_max", "within", "io_bound_jct_s",
                                    "compute_bound_jct_s", "bound_jct_s", "read_bytes"}
        json.dumps(r)  # JSON-able as is
    # Busy SNIC time over the timeline = bytes read / bandwidth.
    r = offline_64k["dualpath"]
    busy = np.array(r["timeline"]["snic_util"]).sum(axis=0) * r["timeline"]["bin_s"]
    np.testing.assert_allclose(busy, np.array(r["snic_read_bytes"]) / C11.snic_read_Bps, rtol=1e-3)


def test_result_timeline_rows_2p4d() -> None:
    r = ex.run_offline(p_nodes=2, d_nodes=4, policy="dualpath", trace=generate(SMALL, 24, seed=1), bin_s=5.0)
    su = np.array(r["timeline"]["snic_util"])
    assert su.shape == (math.ceil(r["jct_s"] / 5.0), 6)
    assert ((su >= 0) & (su <= 1)).all()
    readers = np.array(r["snic_read_bytes"])
    assert math.isclose(r["snic_balance"], readers.max() / readers.mean())


def test_run_many_parallel_equals_sequential() -> None:
    jobs = [(ex.run_offline, dict(p_nodes=1, d_nodes=1, policy=p, agents=8, seed=s))
            for p in ("basic", "dualpath") for s in (0, 1)]
    seq = ex.run_many(jobs, workers=1)
    par = ex.run_many(jobs, workers=2)
    assert [r["jct_s"] for r in par] == [r["jct_s"] for r in seq]
    assert [(r["policy"], r["seed"]) for r in par] == [("basic", 0), ("basic", 1), ("dualpath", 0), ("dualpath", 1)]


# --------------------------------------------------------------------------------------------
# 8. CLI
# --------------------------------------------------------------------------------------------

def run_cli(capsys, *argv: str) -> str:
    rc = cli.main(["sim", *argv])
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


def test_cli_offline_json(capsys) -> None:
    out = run_cli(capsys, "offline", "--agents", "8", "--pd", "1P1D", "--policies", "basic,dualpath", "--json",
                  "--no-progress", "--jobs", "1")
    rep = json.loads(out)
    res = rep["offline"]
    assert [r["policy"] for r in res] == ["basic", "dualpath"]
    assert all(r["mode"] == "offline" and r["agents"] == 8 and r["jct_s"] > 0 for r in res)
    direct = ex.run_offline(p_nodes=1, d_nodes=1, policy="dualpath", agents=8)
    assert res[1]["jct_s"] == direct["jct_s"]


@pytest.mark.parametrize("argv,expect", [
    (["offline", "--pd", "0P1D"], "expected a P/D configuration like 2P4D"),
    (["offline", "--pd", "2x4"], "expected a P/D configuration like 2P4D"),
    (["offline", "--policies", "nope"], "expected a comma list of basic"),
    (["offline", "--policies", "basic,nope"], "nope"),
    (["offline", "--agents", "0"], "expected a positive number"),
    (["sweep", "--pd", "1P1D,0P2D"], "expected a P/D configuration like 2P4D"),
    (["online", "--rate", "0"], "expected a positive number"),
])
def test_cli_argument_errors(capsys, argv, expect) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["sim", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert expect in err, err


def test_cli_trace_roundtrip_and_replay(capsys, tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    out = run_cli(capsys, "trace", "--agents", "5", "--dataset", "32k", "--out", str(f))
    assert "5 trajectories" in out and f.exists()
    assert len(f.read_text().splitlines()) == 5
    out = run_cli(capsys, "trace", "--stats", str(f), "--dataset", "32k")
    assert "5 trajectories" in out and "hit rate" in out
    out = run_cli(capsys, "offline", "--trace", str(f), "--agents", "10", "--pd", "1P1D", "--policies", "dualpath",
                  "--json", "--jobs", "1", "--no-progress")
    (r,) = json.loads(out)["offline"]
    assert r["agents"] == 10
    from dpmove.sim.trace import load_jsonl
    tr = load_jsonl(f)
    assert r["turns"] == 2 * tr.num_turns
    direct = ex.run_offline(p_nodes=1, d_nodes=1, policy="dualpath", trace=tr.tile(10))
    assert r["jct_s"] == direct["jct_s"]


def test_cli_sweep(capsys) -> None:
    out = run_cli(capsys, "sweep", "--pd", "1P1D,1P2D", "--agents", "8", "--jobs", "1", "--no-progress", "--json")
    res = json.loads(out)["pd_sweep"]
    assert [(r["p_nodes"], r["d_nodes"], r["policy"]) for r in res] == [
        (1, 1, "basic"), (1, 1, "dualpath"), (1, 2, "basic"), (1, 2, "dualpath")]
    assert all(r["model"] == "ds-27b" for r in res)
    out = run_cli(capsys, "sweep", "--pd", "1P1D,1P2D", "--agents", "8", "--jobs", "1", "--no-progress")
    assert "1P2D" in out


def test_cli_online(capsys) -> None:
    out = run_cli(capsys, "online", "--pd", "1P1D", "--rate", "0.05", "--duration", "200", "--warmup", "50",
                  "--dataset", "32k", "--policies", "dualpath", "--json", "--jobs", "1", "--no-progress")
    on = json.loads(out)["online"]
    (p,) = on["points"]
    assert p["mode"] == "online" and p["rate_aps"] == 0.05 and isinstance(p["slo_ok"], bool)
    assert on["slo"]["ttft_s"] == ex.SLO_TTFT_S and on["slo"]["tpot_s"] == ex.SLO_TPOT_S
    direct = ex.run_online(p_nodes=1, d_nodes=1, policy="dualpath", rate_aps=0.05, duration_s=200, warmup_s=50,
                           dataset="32k")
    assert p["latency_s"]["ttft"] == direct["latency_s"]["ttft"]


def test_cli_online_bad_warmup(capsys) -> None:
    rc = cli.main(["sim", "online", "--pd", "1P1D", "--rate", "0.05", "--duration", "100", "--warmup", "100",
                   "--jobs", "1", "--no-progress"])
    assert rc == 2
    assert "warmup_s" in capsys.readouterr().err


def test_cli_out_dir(capsys, tmp_path: Path) -> None:
    d = tmp_path / "rep"
    run_cli(capsys, "offline", "--agents", "8", "--pd", "1P1D", "--policies", "basic,dualpath", "--jobs", "1",
            "--no-progress", "--out", str(d))
    assert (d / "report.md").read_text().strip()
    rep = json.loads((d / "report.json").read_text())
    assert [r["policy"] for r in rep["offline"]] == ["basic", "dualpath"]


# --------------------------------------------------------------------------------------------
# 9. validate() at toy size
# --------------------------------------------------------------------------------------------

def test_validate_toy() -> None:
    logs: List[str] = []
    rep = ex.validate(agents=(16,), scale=True, scale_agents=8, scale_factor=2, online=False, sweep_agents=8,
                      workers=1, log=logs.append)
    rows = rep["validation"]
    checks = [r["check"] for r in rows]
    assert len(rows) == 9, checks
    for key in ("JCT Basic / DualPath", "JCT DualPath / Oracle", "with +layerwise", "with +dualpath-nosched",
                "with +dualpath", "Basic 1P1D / Basic 1P2D", "DualPath 1P1D / Basic 2P1D",
                "DualPath 2P1D / DualPath 1P2D", "scale: JCT 4P8D 16 agents / 2P4D 8 agents"):
        assert any(key in c for c in checks), key
    for r in rows:
        assert math.isfinite(r["sim"]) and math.isfinite(r["paper"]) and isinstance(r["ok"], bool)
        assert set(r) == {"check", "paper", "sim", "ratio", "target", "ok"}
    assert [r["policy"] for r in rep["offline"]] == ["basic", "dualpath", "oracle"]
    assert [r["policy"] for r in rep["ablation"]] == list(ex.ABLATION)
    assert len(rep["pd_sweep"]) == 6 and len(rep["scale"]) == 2
    assert (rep["scale"][1]["p_nodes"], rep["scale"][1]["d_nodes"], rep["scale"][1]["agents"]) == (4, 8, 16)
    assert "online" not in rep and rep["calibration"]
    assert len(logs) >= len(rows)
    json.dumps(rep)


def test_dual_path_without_layerwise_is_refused() -> None:
    """DE-read streams Layer Blocks to the PE; the load-then-compute path reads on the PE node
    only, so the combination would account DRAM on the wrong node."""
    pol = sched.Policy("x", layerwise=False, dual_path=True, scheduler=True)
    cfg = SimConfig(cluster=ClusterSpec(p_nodes=1, d_nodes=1), model=get_compute_model("ds-660b"), policy=pol)
    with pytest.raises(ValueError, match="layerwise"):
        Simulation(cfg, generate("64k", 2, seed=0))


def test_max_rate_bad_bounds() -> None:
    with pytest.raises(ValueError, match="lo < hi"):
        ex.max_rate("dualpath", lo=0.5, hi=0.1)


def test_online_replays_a_trace_file(tmp_path, capsys) -> None:
    """`sim online --trace F`: arriving agents follow the file's trajectories, tiled."""
    from dpmove.sim.trace import save_jsonl

    tr = Trace(offsets=[0, 2], append=[640, 64], generated=[8, 8])
    f = tmp_path / "two.jsonl"
    save_jsonl(tr, f)
    rc = cli.main(["sim", "online", "--trace", str(f), "--rate", "0.1", "--duration", "100", "--warmup", "10",
                   "--policies", "dualpath", "--json", "--no-progress", "--jobs", "1"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)["online"]["points"][0]
    assert res["dataset"] == "two.jsonl"
    assert res["turns"] == 2 * res["agents"]  # every arriving agent has the file's two turns
