"""Specification tests for the DualPath scheduling policy (python/dpmove/scheduler.py,
DUALPATH.md section 6).

Each pick function is compared against a reference written the slow, obvious way (a Python
loop over engines with an explicit sort key) on random load reports from fixed seeds, and
checked on small hand-worked examples. Token counts are integer-valued so that sums are exact
and the reference may add them in any order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Sequence, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpmove.scheduler import (
    POLICIES,
    READ_DE,
    READ_PE,
    Policy,
    RoundRobin,
    SchedulerParams,
    build_prefill_batch,
    get_policy,
    pick_decode_engine,
    pick_decode_group,
    pick_prefill_engine_by_node,
    pick_prefill_engine,
    pick_read_side,
)
from dpmove.sim.hardware import get_compute_model

SEEDS = list(range(8))
CASES_PER_SEED = 50  # 8 x 50 = 400 random cases per property


# --------------------------------------------------------------------------------------------
# Reference implementations (slow and obvious)
# --------------------------------------------------------------------------------------------


def ref_pick_prefill_engine(tok: Sequence[float], node: Sequence[int], read_q: Sequence[float],
                            alpha: float, beta: float) -> int:
    best, best_key = -1, None
    for e in range(len(tok)):
        if tok[e] > beta:
            continue
        klass = 0 if read_q[node[e]] <= alpha else 1  # short read queue first
        key = (klass, tok[e])
        if best == -1 or key < best_key:  # strict: the first index wins ties
            best, best_key = e, key
    return best


def ref_pick_decode_group(group_tok: Sequence[float], group_fits: Sequence[bool]) -> int:
    best = -1
    for g in range(len(group_tok)):
        if group_fits[g] and (best == -1 or group_tok[g] < group_tok[best]):
            best = g
    return best


def ref_pick_decode_engine(tok: Sequence[float], seq: Sequence[int], hbm_free: Sequence[float],
                           req_tokens: float, req_hbm: float, pending_tokens: float,
                           z_slack: float) -> int:
    n = len(tok)
    total = 0.0
    for e in range(n):
        total += tok[e]
    z = z_slack * (pending_tokens + total) / n if n else math.nan
    fits = [hbm_free[e] >= req_hbm for e in range(n)]
    best = -1
    for e in range(n):  # prefer: fits and under Z, minimum seq
        if fits[e] and tok[e] + req_tokens <= z and (best == -1 or seq[e] < seq[best]):
            best = e
    if best != -1:
        return best
    for e in range(n):  # else: fits, minimum tok
        if fits[e] and (best == -1 or tok[e] < tok[best]):
            best = e
    return best


def ref_round_robin(ok_seq: List[Sequence[bool]], n: int) -> List[int]:
    cursor, out = 0, []
    for ok in ok_seq:
        pick = -1
        for step in range(n):
            i = (cursor + step) % n
            if ok[i]:
                pick = i
                break
        if pick != -1:
            cursor = (pick + 1) % n
        out.append(pick)
    return out


def ref_build_prefill_batch(new: Sequence[int], ctx: Sequence[int],
                            attention_s: Callable[[float, float], float],
                            quota_s: float) -> Tuple[int, int]:
    used = 0.0
    for i in range(len(new)):
        t = attention_s(new[i], ctx[i])
        if used + t <= quota_s:
            used = used + t
            continue
        k = 0  # linear search for the largest chunk that fits
        while k + 1 < new[i] and used + attention_s(k + 1, ctx[i]) <= quota_s:
            k += 1
        if i == 0 and k == 0:
            return 0, 1
        return i, k
    return len(new), 0


# --------------------------------------------------------------------------------------------
# Random load reports
# --------------------------------------------------------------------------------------------


def random_prefill_case(rng: np.random.Generator):
    n_nodes = int(rng.integers(1, 5))
    n_eng = int(rng.integers(1, 17))
    node = rng.integers(0, n_nodes, size=n_eng).astype(np.int64)
    scale = int(rng.choice([4, 20, 5000]))  # small scales make ties and boundary values common
    tok = rng.integers(0, scale, size=n_eng).astype(np.float64)
    read_q = rng.integers(0, scale, size=n_nodes).astype(np.float64)
    # Thresholds drawn from the same values so that tok == beta and read_q == alpha happen.
    beta = float(rng.choice(np.concatenate([tok, [scale / 2, scale * 2, 0.5]])))
    alpha = float(rng.choice(np.concatenate([read_q, [scale / 2, scale * 2, 0.5]])))
    beta = max(beta, 0.5)
    alpha = max(alpha, 0.5)
    return tok, node, read_q, SchedulerParams(alpha_tokens=alpha, beta_tokens=beta)


def random_decode_case(rng: np.random.Generator):
    n_eng = int(rng.integers(1, 13))
    scale = int(rng.choice([5, 50, 65536]))
    tok = rng.integers(0, scale * 4, size=n_eng).astype(np.float64)
    seq = rng.integers(0, int(rng.choice([3, 64])), size=n_eng).astype(np.int64)
    hbm_free = rng.integers(0, 10, size=n_eng).astype(np.float64) * 1e9
    req_tokens = float(rng.integers(1, scale + 1))
    req_hbm = float(rng.integers(0, 10)) * 1e9
    pending = req_tokens + float(rng.integers(0, scale * 3))
    z_slack = float(rng.choice([1.0, 1.05, 1.5]))
    params = SchedulerParams(alpha_tokens=1.0, beta_tokens=1.0, z_slack=z_slack)
    return tok, seq, hbm_free, req_tokens, req_hbm, pending, params


# --------------------------------------------------------------------------------------------
# pick_prefill_engine
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_pick_prefill_engine_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    for _ in range(CASES_PER_SEED):
        tok, node, read_q, params = random_prefill_case(rng)
        copies = (tok.copy(), node.copy(), read_q.copy())
        got = pick_prefill_engine(tok, node, read_q, params)
        want = ref_pick_prefill_engine(tok.tolist(), node.tolist(), read_q.tolist(),
                                       params.alpha_tokens, params.beta_tokens)
        assert got == want, (tok, node, read_q, params)
        assert isinstance(got, int)
        for a, b in zip(copies, (tok, node, read_q)):
            np.testing.assert_array_equal(a, b)  # inputs are not modified


@pytest.mark.parametrize("seed", SEEDS)
def test_pick_prefill_engine_properties(seed: int) -> None:
    rng = np.random.default_rng(2000 + seed)
    for _ in range(CASES_PER_SEED):
        tok, node, read_q, params = random_prefill_case(rng)
        eligible = tok <= params.beta_tokens
        got = pick_prefill_engine(tok, node, read_q, params)
        # -1 iff no engine is at or under beta
        assert (got == -1) == (not eligible.any())
        if got == -1:
            continue
        assert tok[got] <= params.beta_tokens  # never an engine over beta
        short = eligible & (read_q[node] <= params.alpha_tokens)
        if short.any():
            assert read_q[node[got]] <= params.alpha_tokens  # short-queue class first
            klass = short
        else:
            klass = eligible
        assert tok[got] == tok[klass].min()  # min tok within the class
        assert got == int(np.flatnonzero(klass & (tok == tok[got]))[0])  # lowest index on ties


def test_pick_prefill_engine_hand_worked() -> None:
    params = SchedulerParams(alpha_tokens=50, beta_tokens=8)
    tok = np.array([10.0, 5.0, 7.0, 5.0])
    node = np.array([0, 0, 1, 1])
    # Engine 0 is over beta. Node 0's queue (100) is over alpha, node 1's (10) is not, so the
    # short class is {2, 3}: engine 3 (tok 5) wins, though engine 1 has the same tok and a
    # lower index.
    assert pick_prefill_engine(tok, node, np.array([100.0, 10.0]), params) == 3
    # Both queues long: all eligible engines compete; tie 1 vs 3 on tok 5 -> lowest index.
    assert pick_prefill_engine(tok, node, np.array([100.0, 51.0]), params) == 1
    # read_q == alpha counts as short; tok == beta is still eligible.
    assert pick_prefill_engine(np.array([8.0, 1.0]), np.array([0, 1]), np.array([50.0, 50.5]),
                               params) == 0
    # Everyone over beta: stop fetching.
    assert pick_prefill_engine(np.array([9.0, 8.5]), np.array([0, 1]), np.array([0.0, 0.0]),
                               params) == -1
    # No engines at all.
    assert pick_prefill_engine(np.zeros(0), np.zeros(0, np.int64), np.zeros(1), params) == -1


# --------------------------------------------------------------------------------------------
# pick_decode_group
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_pick_decode_group_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(3000 + seed)
    for _ in range(CASES_PER_SEED):
        g = int(rng.integers(1, 9))
        group_tok = rng.integers(0, int(rng.choice([3, 10**6])), size=g).astype(np.float64)
        group_fits = rng.random(g) < float(rng.choice([0.0, 0.3, 0.8, 1.0]))
        got = pick_decode_group(group_tok, np.where(group_fits, 2.0, 0.0), 1.0)
        assert got == ref_pick_decode_group(group_tok.tolist(), group_fits.tolist())
        assert (got == -1) == (not group_fits.any())
        if got != -1:
            assert group_fits[got]
            assert group_tok[got] == group_tok[group_fits].min()


@pytest.mark.parametrize(
    "group_tok, group_fits, want",
    [
        ([50, 10, 30], [True, False, True], 2),   # least tokens among those that fit
        ([50, 10, 30], [True, True, True], 1),
        ([30, 10, 30], [True, False, True], 0),   # tie -> lowest index
        ([1, 2], [False, False], -1),             # none fits
        ([0, 0, 0], [False, True, True], 1),
    ],
)
def test_pick_decode_group_hand_worked(group_tok, group_fits, want) -> None:
    hbm = [2.0 if f else 0.0 for f in group_fits]
    assert pick_decode_group(np.array(group_tok, dtype=np.float64), np.array(hbm), 1.0) == want
    assert pick_decode_group(list(group_tok), hbm, 1.0) == want


# --------------------------------------------------------------------------------------------
# pick_decode_engine
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_pick_decode_engine_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(4000 + seed)
    for _ in range(CASES_PER_SEED):
        tok, seq, hbm_free, req_tokens, req_hbm, pending, params = random_decode_case(rng)
        copies = (tok.copy(), seq.copy(), hbm_free.copy())
        got = pick_decode_engine(tok, seq, hbm_free, req_tokens, req_hbm, pending, params)
        want = ref_pick_decode_engine(tok.tolist(), seq.tolist(), hbm_free.tolist(), req_tokens,
                                      req_hbm, pending, params.z_slack)
        assert got == want, (tok, seq, hbm_free, req_tokens, req_hbm, pending, params)
        assert isinstance(got, int)
        for a, b in zip(copies, (tok, seq, hbm_free)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", SEEDS)
def test_pick_decode_engine_properties(seed: int) -> None:
    rng = np.random.default_rng(5000 + seed)
    for _ in range(CASES_PER_SEED):
        tok, seq, hbm_free, req_tokens, req_hbm, pending, params = random_decode_case(rng)
        fits = hbm_free >= req_hbm
        got = pick_decode_engine(tok, seq, hbm_free, req_tokens, req_hbm, pending, params)
        assert (got == -1) == (not fits.any())  # -1 exactly when nothing has the HBM
        if got == -1:
            continue
        assert hbm_free[got] >= req_hbm  # never an engine without enough HBM
        z = params.z_slack * (pending + tok.sum()) / len(tok)
        under = fits & (tok + req_tokens <= z)
        if under.any():
            assert under[got]
            assert seq[got] == seq[under].min()
        else:
            assert tok[got] == tok[fits].min()


BIG = 1e12  # bytes: plenty of HBM
P = SchedulerParams(alpha_tokens=1, beta_tokens=1)  # z_slack 1.05


@pytest.mark.parametrize(
    "tok, seq, hbm_free, req_tokens, req_hbm, pending, params, want",
    [
        # sum tok = 1000, Z = 1.05 x (50 + 1000) / 4 = 275.625. tok + len = 150, 250, 350, 450:
        # engines 0 and 1 are under Z; min seq among them (5, 3) -> engine 1.
        ([100, 200, 300, 400], [5, 3, 1, 2], [BIG] * 4, 50, 1e9, 50, P, 1),
        # Same request, but R holds 400 more tokens: Z = 1.05 x 1450 / 4 = 380.625, so engine 2
        # (350) is under Z too and its seq of 1 wins.
        ([100, 200, 300, 400], [5, 3, 1, 2], [BIG] * 4, 50, 1e9, 450, P, 2),
        # As the first, but engine 1 lacks HBM: engine 0 is the only fitting engine under Z.
        ([100, 200, 300, 400], [5, 3, 1, 2], [BIG, 0.5e9, BIG, BIG], 50, 1e9, 50, P, 0),
        # Nobody under Z: Z = 1.05 x (1000 + 220) / 2 = 640.5, tok + len = 1120, 1100.
        # Fall back to min tok (engine 1), ignoring seq (engine 0 has seq 0).
        ([120, 100], [0, 9], [BIG, BIG], 1000, 1e9, 1000, P, 1),
        # Fallback skips the engine without HBM even though it has the least tok.
        ([120, 100, 130], [0, 9, 0], [BIG, 0.0, BIG], 1000, 1e9, 1000, P, 0),
        # Boundary: z_slack 1, Z = (100 + 300) / 2 = 200; engine 0 has tok + len = 200 == Z
        # and is under (<=); engine 1 (300) is not, despite its lower seq.
        ([100, 200], [9, 0], [BIG, BIG], 100, 1e9, 100,
         SchedulerParams(alpha_tokens=1, beta_tokens=1, z_slack=1.0), 0),
        # HBM boundary: hbm_free == req_hbm fits.
        ([100, 200], [1, 1], [1e9, 0.999e9], 10, 1e9, 10, P, 0),
        # Equal seq among those under Z -> lowest index.
        ([10, 10, 10], [2, 2, 2], [BIG] * 3, 5, 1e9, 5, P, 0),
        # Nothing has the HBM: -1 even though the tokens are fine.
        ([0, 0], [0, 0], [0.5e9, 0.9e9], 10, 1e9, 10, P, -1),
    ],
)
def test_pick_decode_engine_hand_worked(tok, seq, hbm_free, req_tokens, req_hbm, pending,
                                        params, want) -> None:
    got = pick_decode_engine(np.array(tok, dtype=np.float64), np.array(seq, dtype=np.int64),
                             np.array(hbm_free, dtype=np.float64), req_tokens, req_hbm, pending,
                             params)
    assert got == want


def test_pick_decode_engine_empty_group() -> None:
    assert pick_decode_engine(np.zeros(0), np.zeros(0, np.int64), np.zeros(0), 1, 1, 1, P) == -1


# --------------------------------------------------------------------------------------------
# pick_read_side
# --------------------------------------------------------------------------------------------


def test_read_side_constants_distinct() -> None:
    assert READ_PE != READ_DE


@pytest.mark.parametrize(
    "pe_q, de_q, want",
    [
        (5.0, 5.0, READ_PE),   # tie stays on the PE side
        (0.0, 0.0, READ_PE),
        (5.0, 4.0, READ_DE),
        (4.0, 5.0, READ_PE),
        (1e9, 1e9 - 1, READ_DE),
    ],
)
def test_pick_read_side_hand_worked(pe_q: float, de_q: float, want: int) -> None:
    assert pick_read_side(pe_q, de_q) == want


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.integers(0, 100), st.integers(0, 100))
def test_pick_read_side_shorter_queue(pe_q: int, de_q: int) -> None:
    want = READ_DE if de_q < pe_q else READ_PE
    assert pick_read_side(float(pe_q), float(de_q)) == want


# --------------------------------------------------------------------------------------------
# RoundRobin
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5])
def test_round_robin_all_true_cycles(n: int) -> None:
    rr = RoundRobin(n)
    picks = [rr.pick(np.ones(n, dtype=bool)) for _ in range(3 * n)]
    assert picks == list(range(n)) * 3


@pytest.mark.parametrize("seed", SEEDS)
def test_round_robin_fair_under_fixed_mask(seed: int) -> None:
    rng = np.random.default_rng(6000 + seed)
    n = int(rng.integers(1, 10))
    ok = rng.random(n) < 0.6
    ok[int(rng.integers(0, n))] = True
    rr = RoundRobin(n)
    rounds = 7
    picks = [rr.pick(ok) for _ in range(rounds * int(ok.sum()))]
    counts = np.bincount(picks, minlength=n)
    np.testing.assert_array_equal(counts, np.where(ok, rounds, 0))  # each True equally, False never


@pytest.mark.parametrize("seed", SEEDS)
def test_round_robin_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(7000 + seed)
    for _ in range(CASES_PER_SEED // 5):
        n = int(rng.integers(1, 9))
        p = float(rng.choice([0.0, 0.2, 0.5, 1.0]))
        masks = [rng.random(n) < p for _ in range(40)]
        rr = RoundRobin(n)
        got = [rr.pick(m) for m in masks]
        assert got == ref_round_robin([m.tolist() for m in masks], n)
        for m, g in zip(masks, got):
            assert (g == -1) == (not m.any())
            if g != -1:
                assert m[g]


def test_round_robin_all_false_keeps_cursor() -> None:
    rr = RoundRobin(3)
    assert rr.pick(np.array([True, True, True])) == 0
    assert rr.pick(np.zeros(3, dtype=bool)) == -1
    assert rr.pick(np.zeros(3, dtype=bool)) == -1
    assert rr.pick(np.array([True, True, True])) == 1  # the -1 picks did not move the turn


def test_round_robin_skips_false() -> None:
    rr = RoundRobin(4)
    assert rr.pick(np.array([False, False, True, False])) == 2
    assert rr.pick(np.array([True, False, True, False])) == 0  # wraps past the end
    assert rr.pick(np.array([True, False, True, False])) == 2


@pytest.mark.parametrize("length", [0, 2, 4])
def test_round_robin_wrong_length(length: int) -> None:
    rr = RoundRobin(3)
    with pytest.raises(ValueError, match="expected 3 flags"):
        rr.pick(np.ones(length, dtype=bool))


@pytest.mark.parametrize("n", [0, -1])
def test_round_robin_needs_positive_n(n: int) -> None:
    with pytest.raises(ValueError, match="n > 0"):
        RoundRobin(n)


# --------------------------------------------------------------------------------------------
# build_prefill_batch
# --------------------------------------------------------------------------------------------


def linear_attention(new: float, ctx: float) -> float:
    return new * 1e-4  # 0.1 ms per new token, ignoring the context


def grid_attention(new: float, ctx: float) -> float:
    # Integer-valued, so sums are exact and "exactly at the quota" cases really happen.
    return float(new * (1 + int(ctx) // 1000))


DS660B = get_compute_model("ds-660b")


def check_batch(new: Sequence[int], ctx: Sequence[int], attention_s, quota: float) -> None:
    got = build_prefill_batch(new, ctx, attention_s, quota)
    want = ref_build_prefill_batch(new, ctx, attention_s, quota)
    assert got == want, (list(new), list(ctx), quota)
    n_whole, chunk = got
    assert 0 <= n_whole <= len(new)
    if n_whole == len(new):
        assert chunk == 0
        return
    assert chunk < new[n_whole]  # a chunk is a strict part of the next request
    used = 0.0
    for i in range(n_whole):
        used = used + attention_s(new[i], ctx[i])
    if (n_whole, chunk) == (0, 1) and attention_s(1, ctx[0]) > quota:
        return  # the head request's first token alone: progress beats the quota
    # Within quota ...
    assert used + (attention_s(chunk, ctx[n_whole]) if chunk else 0.0) <= quota
    # ... and maximal: one more token of the next request overflows.
    assert used + attention_s(chunk + 1, ctx[n_whole]) > quota


@pytest.mark.parametrize("seed", SEEDS)
def test_build_prefill_batch_linear(seed: int) -> None:
    rng = np.random.default_rng(8000 + seed)
    for _ in range(CASES_PER_SEED):
        k = int(rng.integers(1, 12))
        new = [int(x) for x in rng.integers(0 if rng.random() < 0.1 else 1, 3001, size=k)]
        ctx = [int(x) for x in rng.integers(0, 65537, size=k)]
        quota = float(rng.choice([0.3, 0.05, 1e-4, 0.5e-4, 2.0]))
        check_batch(new, ctx, linear_attention, quota)


@pytest.mark.parametrize("seed", SEEDS)
def test_build_prefill_batch_grid_exact_boundaries(seed: int) -> None:
    rng = np.random.default_rng(9000 + seed)
    for _ in range(CASES_PER_SEED):
        k = int(rng.integers(1, 8))
        new = [int(x) for x in rng.integers(1, 200, size=k)]
        ctx = [int(x) for x in rng.integers(0, 4000, size=k)]
        # Quotas at exact prefix sums make "used + t == quota" (which must fit) common.
        costs = np.cumsum([grid_attention(n, c) for n, c in zip(new, ctx)])
        quota = float(rng.choice(np.concatenate([costs, [1.0, 3.0, 300.0]])))
        check_batch(new, ctx, grid_attention, quota)


@pytest.mark.parametrize("seed", SEEDS)
def test_build_prefill_batch_ds660b(seed: int) -> None:
    rng = np.random.default_rng(10000 + seed)
    for _ in range(CASES_PER_SEED):
        k = int(rng.integers(1, 16))
        new = [int(x) for x in rng.integers(100, 3001, size=k)]
        ctx = [int(x) for x in rng.integers(0, 65537, size=k)]
        check_batch(new, ctx, DS660B.attention_s, 0.3)


def test_build_prefill_batch_empty() -> None:
    assert build_prefill_batch([], [], linear_attention, 0.3) == (0, 0)


def test_build_prefill_batch_head_token_over_quota() -> None:
    # One token costs 0.1 ms > 0.05 ms quota: the head request's first token goes alone.
    assert build_prefill_batch([500, 10], [0, 0], linear_attention, 0.5e-4) == (0, 1)
    assert build_prefill_batch([1], [0], linear_attention, 0.5e-4) == (0, 1)
    # Real model: one token at 64K context costs ~40 us; a 10 us quota cannot hold it.
    assert DS660B.attention_s(1, 65536) > 1e-5
    assert build_prefill_batch([2000], [65536], DS660B.attention_s, 1e-5) == (0, 1)


def test_build_prefill_batch_hand_worked() -> None:
    # 0.1 ms per token, 300 ms quota = 3000 tokens.
    # 1000 + 1500 whole (2500), then 500 of the 800-token third request.
    assert build_prefill_batch([1000, 1500, 800, 10], [0] * 4, linear_attention, 0.3) == (2, 500)
    # Exactly at quota (grid costs: 100 + 200 = 300): both whole, next gets nothing.
    assert build_prefill_batch([100, 100, 50], [0, 1000, 0], grid_attention, 300.0) == (2, 0)
    # Everything fits.
    assert build_prefill_batch([100, 100], [0, 0], grid_attention, 1e6) == (2, 0)
    # Head request larger than the quota: chunked to the quota (grid cost 2 per token).
    assert build_prefill_batch([500, 1], [1000, 0], grid_attention, 301.0) == (0, 150)


def test_build_prefill_batch_ds660b_hand_worked() -> None:
    # ds-660b: 3000 new tokens at no context cost ~353 ms > 300 ms quota, so a lone such
    # request is chunked; the chunk is the largest k with attention_s(k, 0) <= 0.3.
    n_whole, chunk = build_prefill_batch([3000], [0], DS660B.attention_s, 0.3)
    assert n_whole == 0 and 0 < chunk < 3000
    assert DS660B.attention_s(chunk, 0) <= 0.3 < DS660B.attention_s(chunk + 1, 0)
    # 100 tokens at 64K context (~47 ms) x 6 = ~282 ms fit; the 7th request is chunked.
    n_whole, chunk = build_prefill_batch([100] * 8, [65536] * 8, DS660B.attention_s, 0.3)
    assert n_whole == 6 and 0 < chunk < 100


def test_build_prefill_batch_accepts_numpy() -> None:
    new = np.array([1000, 1500, 800], dtype=np.int64)
    ctx = np.array([0, 0, 0], dtype=np.int64)
    assert build_prefill_batch(new, ctx, linear_attention, 0.3) == (2, 500)


# --------------------------------------------------------------------------------------------
# SchedulerParams, get_policy, POLICIES
# --------------------------------------------------------------------------------------------


def test_scheduler_params_defaults() -> None:
    p = SchedulerParams(alpha_tokens=10.0, beta_tokens=20.0)
    assert p.z_slack == 1.05
    assert p.quota_s == 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.alpha_tokens = 5.0  # type: ignore[misc]
    SchedulerParams(alpha_tokens=1e-9, beta_tokens=1e-9, z_slack=1.0, quota_s=1e-9)  # edges OK


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha_tokens=0, beta_tokens=1), "alpha_tokens and beta_tokens"),
        (dict(alpha_tokens=-1, beta_tokens=1), "alpha_tokens and beta_tokens"),
        (dict(alpha_tokens=1, beta_tokens=0), "alpha_tokens and beta_tokens"),
        (dict(alpha_tokens=1, beta_tokens=-5), "alpha_tokens and beta_tokens"),
        (dict(alpha_tokens=math.nan, beta_tokens=1), "alpha_tokens and beta_tokens"),
        (dict(alpha_tokens=1, beta_tokens=math.nan), "alpha_tokens and beta_tokens"),
        (dict(alpha_tokens=1, beta_tokens=1, z_slack=0.99), "z_slack"),
        (dict(alpha_tokens=1, beta_tokens=1, z_slack=0.0), "z_slack"),
        (dict(alpha_tokens=1, beta_tokens=1, z_slack=math.nan), "z_slack"),
        (dict(alpha_tokens=1, beta_tokens=1, quota_s=0.0), "quota_s"),
        (dict(alpha_tokens=1, beta_tokens=1, quota_s=-0.3), "quota_s"),
        (dict(alpha_tokens=1, beta_tokens=1, quota_s=math.nan), "quota_s"),
    ],
)
def test_scheduler_params_invalid(kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SchedulerParams(**kwargs)


EXPECTED_POLICIES = {
    #                    layerwise dual_path scheduler free_io
    "basic":            (False, False, False, False),
    "layerwise":        (True, False, False, False),
    "dualpath-nosched": (True, True, False, False),
    "dualpath":         (True, True, True, False),
    "oracle":           (True, True, True, True),
}


def test_policies_table_names() -> None:
    assert set(POLICIES) == set(EXPECTED_POLICIES)
    for name, pol in POLICIES.items():
        assert isinstance(pol, Policy)
        assert pol.name == name


@pytest.mark.parametrize("name", sorted(EXPECTED_POLICIES))
def test_policies_table_flags(name: str) -> None:
    pol = get_policy(name)
    assert pol is POLICIES[name]
    assert (pol.layerwise, pol.dual_path, pol.scheduler, pol.free_io) == EXPECTED_POLICIES[name]


def test_basic_has_nothing_and_only_oracle_is_free() -> None:
    basic = POLICIES["basic"]
    assert not (basic.layerwise or basic.dual_path or basic.scheduler or basic.free_io)
    assert POLICIES["oracle"].free_io
    assert [n for n, p in POLICIES.items() if p.free_io] == ["oracle"]


@pytest.mark.parametrize("bad", ["nope", "", "DualPath-X", "round-robin"])
def test_get_policy_unknown_lists_known(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        get_policy(bad)
    msg = str(info.value)
    assert repr(bad) in msg
    for name in POLICIES:
        assert name in msg


# --------------------------------------------------------------------------------------------
# pick_prefill_engine_by_node: the per-node summary form the simulator uses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_pick_prefill_engine_by_node_matches_flat(seed: int) -> None:
    """Same choice as pick_prefill_engine over all engines, given each node's least-loaded
    engine (lowest index on ties) and whether its read queue is within alpha."""
    rng = np.random.default_rng(7000 + seed)
    for _ in range(CASES_PER_SEED):
        nodes, per = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        tok = rng.integers(0, int(rng.choice([4, 10**5])), size=nodes * per).astype(np.float64)
        node = np.repeat(np.arange(nodes), per)
        read_q = rng.integers(0, 20, size=nodes).astype(np.float64)
        params = SchedulerParams(alpha_tokens=float(rng.integers(1, 20)),
                                 beta_tokens=float(rng.choice([2.0, 5e4, 1e6])))
        blocks = tok.reshape(nodes, per)
        min_idx = blocks.argmin(axis=1) + np.arange(nodes) * per
        short = (read_q <= params.alpha_tokens).tolist()
        got = pick_prefill_engine_by_node(blocks.min(axis=1).tolist(), min_idx.tolist(), short, params)
        assert got == pick_prefill_engine(tok, node, read_q, params)


def test_round_robin_uncommitted_pick_keeps_the_turn() -> None:
    """A placement that fails after the PE was chosen must not pass the turn on."""
    rr = RoundRobin(3)
    ok = np.array([True, True, True])
    assert rr.pick(ok, commit=False) == 0
    assert rr.pick(ok, commit=False) == 0
    rr.commit(0)
    assert rr.pick(ok) == 1
    assert rr.pick(ok) == 2
    assert rr.pick(ok) == 0
