"""The traffic-class arbiter as pure logic: deterministic arrival sequences in simulated time
(no I/O, no clock), and hypothesis properties under saturation."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dpmove
from dpmove.qos import QosConfig, TrafficClass

MS = 1_000_000


def arbiter(classes, bound_ms=20.0, quantum=64 * 1024):
    cfg = QosConfig(classes={c.name: c for c in classes}, starvation_bound_ms=bound_ms, quantum_bytes=quantum,
                    default_class=classes[0].name)
    return cfg.arbiter()


def serve(arb, now, capacity_bps, until, refill=None, max_grants=20_000, max_bytes=2**62):
    """One server of `capacity_bps`: takes the next grant, is busy bytes/capacity, repeats until
    `until` ns, `max_grants` grants or `max_bytes` bytes. refill(cls) is called after each grant
    (to keep a class saturated). Returns the grants and the time reached."""
    grants = []
    sent = 0
    while now < until and len(grants) < max_grants and sent < max_bytes:
        g = arb.dequeue(now)
        if g is None:
            nxt = arb.next_eligible(now)
            if nxt >= 2**62:
                break
            now = max(nxt, now + 1)
            continue
        grants.append((now, *g))
        sent += g[2]
        now += max(1, int(g[2] * 1e9 / capacity_bps))
        if refill:
            refill(g[0], now)
    return grants, now


def test_strict_priority_between_levels():
    arb = arbiter([TrafficClass("bulk", 0, 1), TrafficClass("control", 1, 1)])
    b, c = arb.find("bulk"), arb.find("control")
    for i in range(3):
        arb.enqueue(b, 100 + i, 1 << 20, 0)
    arb.enqueue(c, 1, 4096, 1)
    arb.enqueue(c, 2, 4096, 2)
    order = [arb.dequeue(10)[1] for _ in range(5)]
    assert order == [1, 2, 100, 101, 102]
    assert arb.dequeue(10) is None and arb.queued == 0


def test_drr_byte_shares_follow_weights_with_mixed_sizes():
    # Same level, weights 3:1; class a sends 4 KiB ops, class b 1 MiB ops: bytes, not ops, are shared.
    arb = arbiter([TrafficClass("a", 0, 3), TrafficClass("b", 0, 1)], quantum=256 * 1024)
    a, b = arb.find("a"), arb.find("b")
    sizes = {a: 4096, b: 1 << 20}
    seq = [0]

    def refill(cls, now):
        seq[0] += 1
        arb.enqueue(cls, seq[0], sizes[cls], now)

    for cls in (a, b):
        for _ in range(4):
            refill(cls, 0)
    grants, _ = serve(arb, 0, 10e9, 2_000 * MS, refill)
    got = {a: 0, b: 0}
    for _, cls, _, nbytes, _ in grants:
        got[cls] += nbytes
    share = got[a] / (got[a] + got[b])
    assert abs(share - 0.75) < 0.01, (share, got)


def test_starvation_bound_lets_the_low_lane_through():
    # control saturates the server; bulk ops still start within the bound plus one service time.
    bound_ms = 5.0
    arb = arbiter([TrafficClass("control", 1, 1), TrafficClass("bulk", 0, 1)], bound_ms=bound_ms)
    c, b = arb.find("control"), arb.find("bulk")
    seq = [0]

    def refill(cls, now):
        if cls == c:
            seq[0] += 1
            arb.enqueue(c, seq[0], 64 * 1024, now)

    for _ in range(8):
        refill(c, 0)
    for i in range(50):
        arb.enqueue(b, 10_000 + i, 64 * 1024, 0)
    grants, _ = serve(arb, 0, 1e9, 200 * MS, refill)
    low = [g for g in grants if g[1] == b]
    assert low, "the low lane never ran"
    service_ns = 64 * 1024 * 1e9 / 1e9
    assert max(g[4] for g in low) <= bound_ms * MS + 50 * service_ns
    s = arb.stats(b)
    assert s["starvation_grants"] == len(low)
    # ...and the high lane keeps nearly everything: one low op per bound.
    share = sum(g[3] for g in grants if g[1] == c) / sum(g[3] for g in grants)
    assert share > 0.95, share


def test_rate_limit_caps_bytes_and_counts_throttled_time():
    rate, burst = 100e6, 1 << 20  # 100 MB/s, 1 MiB bucket
    arb = arbiter([TrafficClass("kv_load", 0, 1, rate=rate, burst=burst)])
    k = arb.find("kv_load")
    for i in range(400):
        arb.enqueue(k, i, 256 * 1024, 0)
    grants, now = serve(arb, 0, 10e9, 1000 * MS)
    sent = sum(g[3] for g in grants)
    assert sent <= burst + rate * 1.0 + 256 * 1024
    assert sent >= rate * 1.0 * 0.95, sent
    assert arb.stats(k)["throttled_ns"] > 800 * MS


def test_work_conserving_when_the_high_lane_is_throttled():
    arb = arbiter([TrafficClass("control", 1, 1, rate=1e6, burst=4096), TrafficClass("bulk", 0, 1)])
    c, b = arb.find("control"), arb.find("bulk")
    for i in range(10):
        arb.enqueue(c, i, 4096, 0)
        arb.enqueue(b, 100 + i, 4096, 0)
    first = [arb.dequeue(0) for _ in range(3)]
    assert first[0][0] == c  # one burst's worth of control
    assert [g[0] for g in first[1:]] == [b, b]  # then bulk uses the idle capacity
    nxt = arb.next_eligible(0)
    assert 4_000_000 <= nxt <= 4_200_000, nxt  # 4096 B at 1 MB/s


def test_operation_larger_than_burst_and_quantum():
    arb = arbiter([TrafficClass("a", 0, 1, rate=1e9, burst=4096), TrafficClass("b", 0, 1)], quantum=4096)
    a, b = arb.find("a"), arb.find("b")
    arb.enqueue(a, 1, 64 << 20, 0)  # 64 MiB: far above burst and quantum
    arb.enqueue(b, 2, 64 << 20, 0)
    got = {arb.dequeue(0)[1], arb.dequeue(0)[1]}
    assert got == {1, 2}  # both served at once: no loop of 16k rounds, no deadlock


def test_wait_quantiles():
    arb = arbiter([TrafficClass("a", 0, 1)])
    a = arb.find("a")
    for i in range(100):
        arb.enqueue(a, i, 1, 0)
    for i in range(100):
        arb.dequeue((i + 1) * 1000)
    s = arb.stats(a)
    assert s["ops"] == 100 and s["bytes"] == 100 and s["queued"] == 0
    assert 44_000 <= s["wait_p50_ns"] <= 50_000 and 88_000 <= s["wait_p99_ns"] <= 99_000, s
    assert s["wait_max_ns"] == 100_000


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.integers(1, 10), min_size=2, max_size=4),
    sizes=st.lists(st.sampled_from([4096, 16384, 65536, 262144]), min_size=4, max_size=4),
)
def test_property_shares_converge_to_weights(weights, sizes):
    classes = [TrafficClass(f"c{i}", 0, w) for i, w in enumerate(weights)]
    quantum = 4096
    arb = arbiter(classes, bound_ms=1e6, quantum=quantum)
    seq = [0]

    def refill(cls, now):
        seq[0] += 1
        arb.enqueue(cls, seq[0], sizes[cls], now)

    for i in range(len(weights)):
        for _ in range(4):
            refill(i, 0)
    total_w = sum(weights)
    # Long enough for every class to get many quanta: DRR's error is bounded by about one
    # largest operation plus one quantum per class, independent of the run length.
    # DRR keeps each class within about one largest operation plus one turn's quantum of its
    # weighted share, however long the run: run until that slack is under 1/15 of the total.
    slack = sum(max(sizes[: len(weights)]) + w * quantum for w in weights)
    grants, _ = serve(arb, 0, 1e9, 2**62, refill, max_grants=200_000, max_bytes=15 * slack)
    got = [0] * len(weights)
    for _, cls, _, nbytes, _ in grants:
        got[cls] += nbytes
    total = sum(got)
    for i, w in enumerate(weights):
        assert abs(got[i] - total * w / total_w) <= slack, (weights, sizes, got)
    assert total >= 15 * slack, (total, slack)


@settings(max_examples=60, deadline=None)
@given(
    bound_ms=st.sampled_from([1.0, 5.0, 20.0]),
    low_sizes=st.lists(st.sampled_from([4096, 65536, 1 << 20]), min_size=1, max_size=30),
    high_size=st.sampled_from([4096, 65536, 1 << 20]),
)
def test_property_no_class_waits_past_the_bound(bound_ms, low_sizes, high_size):
    # The high lane is saturated for the whole run; every low op must start within the bound
    # plus the service time of the one operation that may be running when the bound passes.
    arb = arbiter([TrafficClass("control", 1, 1), TrafficClass("bulk", 0, 1)], bound_ms=bound_ms)
    c, b = arb.find("control"), arb.find("bulk")
    seq = [0]

    def refill(cls, now):
        if cls == c:
            seq[0] += 1
            arb.enqueue(c, seq[0], high_size, now)

    refill(c, 0)
    for i, sz in enumerate(low_sizes):
        arb.enqueue(b, 1_000_000 + i, sz, 0)
    capacity = 1e9
    longest = max(high_size, *low_sizes) * 1e9 / capacity
    horizon = int((bound_ms * MS + longest) * (len(low_sizes) + 2))
    grants, _ = serve(arb, 0, capacity, horizon, refill)
    low = [g for g in grants if g[1] == b]
    assert len(low) == len(low_sizes)
    # Low ops queue behind each other: the k-th may wait k service times of the ones before it.
    for k, g in enumerate(low):
        assert g[4] <= bound_ms * MS + longest * (k + 1) + 1, (k, g, bound_ms)


def test_config_defaults_follow_the_paper():
    cfg = QosConfig().validate()
    assert set(cfg.classes) >= {"control", "kv_load", "kv_store", "bulk"}
    high = max(c.level for c in cfg.classes.values())
    assert [n for n, c in cfg.classes.items() if c.level == high] == ["control"]
    assert cfg.default_class in cfg.classes


def test_config_from_toml_and_env(tmp_path):
    p = tmp_path / "qos.toml"
    p.write_text(
        'starvation_bound_ms = 10\nquantum_bytes = "128 KiB"\n'
        '[classes.kv_load]\nweight = 8\nrate = "2.5 GB"\nburst = "64 MiB"\n'
        "[classes.scrub]\nlevel = -1\n"
    )
    cfg = QosConfig.from_toml(p)
    assert cfg.quantum_bytes == 128 * 1024 and cfg.starvation_bound_ms == 10
    assert cfg.classes["kv_load"].weight == 8 and cfg.classes["kv_load"].rate == 2.5e9
    assert cfg.classes["kv_load"].burst == 64 << 20 and cfg.classes["scrub"].level == -1
    env = {"DPMOVE_QOS_FILE": os.fspath(p), "DPMOVE_QOS": "kv_load.rate=1e9; control.ib_sl=2; quantum_bytes=4096"}
    cfg = QosConfig.from_env(env)
    assert cfg.classes["kv_load"].rate == 1e9 and cfg.classes["kv_load"].weight == 8
    assert cfg.classes["control"].ib_sl == 2 and cfg.quantum_bytes == 4096
    assert cfg.arbiter().num_classes == 5


@pytest.mark.parametrize(
    "data, match",
    [
        ({"classes": {"kv_load": {"weight": 0}}}, "weight"),
        ({"classes": {"kv_load": {"wieght": 2}}}, "unknown field"),
        ({"clases": {}}, "unknown key"),
        ({"classes": {"kv_load": {"rate": "fast"}}}, "bytes"),
        ({"classes": {"kv_load": {"rate": -1}}}, ">= 0"),
        ({"classes": {"kv_load": {"ib_sl": 16}}}, "ib_sl"),
        ({"classes": {"bad-name": {}}}, "identifier"),
        ({"default_class": "nope"}, "default_class"),
        ({"starvation_bound_ms": 0}, "starvation"),
    ],
)
def test_config_rejects_bad_input(data, match):
    with pytest.raises(ValueError, match=match):
        QosConfig().update(data)


def test_config_rejects_bad_env_and_toml(tmp_path):
    with pytest.raises(ValueError, match="class.field=value"):
        QosConfig.from_env({"DPMOVE_QOS": "kv_load.rate"})
    p = tmp_path / "bad.toml"
    p.write_text("[classes\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        QosConfig.from_toml(p)


def test_core_rejects_bad_classes():
    with pytest.raises(ValueError, match="at least one"):
        dpmove._core.QosArbiter([], 1, 1)
    arb = QosConfig().arbiter()
    with pytest.raises(ValueError, match="out of range"):
        arb.enqueue(99, 1, 1, 0)


def test_arbiter_cost_per_operation_is_measured():
    # The figure goes to the notes (target <= 100 ns); here only that it is a sane number.
    ns = QosConfig().microbench(200_000)
    assert 0 < ns < 100_000
