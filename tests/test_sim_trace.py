"""Workload of dpmove sim (dpmove.sim.trace): Table 2 statistics, the compaction rule, replay.

The synthetic generator is checked against the paper's Table 2 with 500 agents (turns, append,
generated and avg_context within 5 %; total_tokens is documented not to match), against the
compaction rule turn by turn, and for determinism. JSONL replay must round-trip exactly and
reject every malformed line with a ValueError naming the file and line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from dpmove.sim.trace import (
    DATASETS,
    DatasetStats,
    Trace,
    compare,
    generate,
    load_jsonl,
    save_jsonl,
)

NAMES = sorted(DATASETS)
MATCHED = ("turns", "append", "generated", "avg_context")


def test_table2() -> None:
    rows = {n: dataclasses.astuple(d)[:7] for n, d in DATASETS.items()}
    assert rows == {
        "32k": ("32k", 32768, 60, 608, 148, 28639, 17183),
        "48k": ("48k", 49152, 106, 474, 172, 42607, 25120),
        "64k": ("64k", 65536, 157, 429, 176, 55958, 32721),
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_generated_stats_match_table(name: str, seed: int) -> None:
    ds = DATASETS[name]
    tr = generate(name, 500, seed=seed)
    cmp = compare(tr, name)
    for col in MATCHED:
        assert cmp[col]["ratio"] == pytest.approx(1, abs=0.05), (col, cmp[col])
        assert cmp[col]["table"] == getattr(ds, col)
    assert cmp["max_ctx"]["trace"] <= ds.max_ctx
    s = tr.stats()
    # The hit rate is 1 - append / avg_context by definition; the paper gives 98.7 % for 64k.
    assert s["hit_rate"] == pytest.approx(1 - s["append"] / s["avg_context"], rel=1e-12)
    if name == "64k":
        assert s["hit_rate"] == pytest.approx(0.987, abs=0.002)
    assert 0 < s["total_tokens"] <= ds.max_ctx
    assert cmp["total_tokens"]["ratio"] == s["total_tokens"] / ds.total_tokens


@pytest.mark.parametrize("name", NAMES)
def test_compaction_rule(name: str) -> None:
    """Every later turn either extends the previous turn's context or compacts, and compacts
    exactly when the extended context + append + generated would exceed the window."""
    ds = DATASETS[name]
    tr = generate(name, 300, seed=3)
    c, a, g, off = tr.context, tr.append, tr.generated, tr.offsets
    end = c + a + g
    assert end.max() <= ds.max_ctx
    assert np.all(c[off[:-1]] == 0) and np.all(a >= 1) and np.all(g >= 1)
    later = np.ones(tr.num_turns, bool)
    later[off[:-1]] = False
    prev = np.roll(end, 1)
    kept = later & (c == prev)
    compacted = later & (c == 0)
    assert np.all((kept | compacted)[later])
    assert np.all(end[kept] <= ds.max_ctx)
    raw = a - ds.compact_tokens  # the append before the summary was added
    assert np.all(raw[compacted] >= 1)
    assert np.all(prev[compacted] + raw[compacted] + g[compacted] > ds.max_ctx)
    assert compacted.sum() > tr.num_agents // 4  # the window is really hit
    assert np.all(tr.think_s == 0)


def test_max_ctx_override_and_think_time() -> None:
    tr = generate("64k", 200, seed=5, max_ctx=16384)
    assert tr.stats()["max_context"] <= 16384
    base = generate("48k", 100, seed=9)
    thinking = generate("48k", 100, seed=9, think_s=2.0)
    for col in ("offsets", "context", "append", "generated"):
        assert np.array_equal(getattr(base, col), getattr(thinking, col))
    assert np.all(thinking.think_s >= 0)
    assert thinking.think_s.mean() == pytest.approx(2.0, rel=0.1)


def test_custom_dataset_and_bad_arguments() -> None:
    ds = DatasetStats("8k", 8192, 20, 300, 100, 0, 0, first_prompt=1000, compact_tokens=512)
    tr = generate(ds, 400, seed=2)
    s = tr.stats()
    assert s["max_context"] <= 8192
    assert s["append"] == pytest.approx(300, rel=0.05) and s["turns"] == pytest.approx(20, rel=0.05)
    with pytest.raises(ValueError, match="unknown dataset '16k', expected one of"):
        generate("16k", 10)
    with pytest.raises(ValueError, match="num_agents >= 1"):
        generate("32k", 0)
    with pytest.raises(ValueError, match="think_s >= 0 seconds"):
        generate("32k", 5, think_s=-1.0)
    with pytest.raises(ValueError, match="compact_tokens <= max_ctx"):
        generate(dataclasses.replace(ds, compact_tokens=6000), 10)
    with pytest.raises(ValueError, match="leave no room"):
        generate(dataclasses.replace(ds, first_prompt=7000), 10)


def test_determinism() -> None:
    a, b, c = (
        generate("32k", 200, seed=7),
        generate("32k", 200, seed=7),
        generate("32k", 200, seed=8),
    )
    for col in ("offsets", "context", "append", "generated", "think_s"):
        assert np.array_equal(getattr(a, col), getattr(b, col))
    assert not np.array_equal(a.offsets, c.offsets) or not np.array_equal(a.append, c.append)


def small() -> Trace:
    # Agent 0: 3 turns, the last compacted; agent 1: 1 turn with a shared cached prefix; agent 2.
    return Trace(
        offsets=[0, 3, 4, 6],
        append=[100, 20, 50, 70, 5, 6],
        generated=[10, 11, 12, 13, 14, 15],
        context=[0, 110, 0, 64, 0, 19],
        think_s=[0.5, 0.0, 1.25, 0.0, 0.1, 3.0],
    )


def test_trace_basics() -> None:
    tr = small()
    assert (tr.num_agents, tr.num_turns) == (3, 6)
    ag = tr.agent(0)
    assert ag.context.tolist() == [0, 110, 0] and ag.append.tolist() == [100, 20, 50]
    assert np.shares_memory(ag.append, tr.append)  # views
    assert tr.agent(-1).generated.tolist() == [14, 15]
    with pytest.raises(IndexError):
        tr.agent(3)
    s = tr.stats()
    full = np.array([100, 130, 50, 134, 5, 25])
    assert s["turns"] == 2 and s["append"] == pytest.approx(251 / 6)
    assert s["generated"] == pytest.approx(75 / 6)
    assert s["avg_context"] == pytest.approx(full.mean())
    assert s["total_tokens"] == pytest.approx((62 + 147 + 40) / 3)
    assert s["hit_rate"] == pytest.approx(193 / full.sum())
    assert s["max_context"] == 147
    # Without context: the default chain, no compaction.
    d = Trace([0, 2, 3], append=[5, 6, 7], generated=[1, 2, 3])
    assert d.context.tolist() == [0, 6, 0] and d.think_s.tolist() == [0, 0, 0]
    assert d.context.dtype == np.int64 and d.offsets.dtype == np.int64


def test_subset_and_tile() -> None:
    tr = small()
    sub = tr.subset(2)
    assert sub.offsets.tolist() == [0, 3, 4]
    assert sub.context.tolist() == [0, 110, 0, 64]
    assert sub.think_s.tolist() == [0.5, 0.0, 1.25, 0.0]
    big = tr.tile(7)
    assert big.num_agents == 7 and big.offsets.tolist() == [0, 3, 4, 6, 9, 10, 12, 15]
    for i in range(7):
        for x, y in zip(big.agent(i), tr.agent(i % 3)):
            assert np.array_equal(x, y)
    assert tr.tile(2).offsets.tolist() == [0, 3, 4]
    g = generate("64k", 50, seed=1)
    t = g.tile(480)
    assert t.num_turns == 480 // 50 * g.num_turns + g.subset(30).num_turns
    assert t.stats()["max_context"] == g.stats()["max_context"]
    for n in (0, 4):
        with pytest.raises(ValueError, match="subset: expected 1 <= n <= 3"):
            tr.subset(n)
    with pytest.raises(ValueError, match="tile: expected n >= 1"):
        tr.tile(0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(offsets=[1, 2], append=[1], generated=[1]), "starting at 0"),
        (
            dict(offsets=[0, 2, 2], append=[1, 1], generated=[1, 1]),
            "strictly increasing.*agent 1 has 0",
        ),
        (dict(offsets=[0, 2], append=[1], generated=[1]), "append: expected 2 rows"),
        (dict(offsets=[0, 2], append=[1, 1], generated=[1]), "generated: expected 2 rows"),
        (
            dict(offsets=[0, 2], append=[1, -1], generated=[1, 1]),
            "non-negative counts, got -1 at row 1",
        ),
        (dict(offsets=[0, 2], append=[1.5, 1], generated=[1, 1]), "integer token counts"),
        (dict(offsets=[0, 2], append=[[1, 1]], generated=[1, 1]), "1-D array"),
        (
            dict(offsets=[0, 2], append=[1, 1], generated=[1, 1], context=[0]),
            "context: expected 2 rows",
        ),
        (
            dict(offsets=[0, 2], append=[1, 1], generated=[1, 1], context=[0, 3]),
            "row 1 reuses 3.*at most.* = 2",
        ),
        (
            dict(offsets=[0, 2], append=[1, 1], generated=[1, 1], think_s=[0, -1]),
            "non-negative seconds",
        ),
        (
            dict(offsets=[0, 2], append=[1, 1], generated=[1, 1], think_s=[0]),
            "think_s: expected 2 rows",
        ),
        (dict(offsets=[0, 1], append=[1], generated=[1], ids=["a", "b"]), "expected 1 ids"),
    ],
)
def test_trace_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Trace(**kwargs)


def test_trace_explicit_first_context_allowed() -> None:
    tr = Trace([0, 1, 2], append=[3, 4], generated=[1, 1], context=[100, 50])
    assert tr.stats()["hit_rate"] == pytest.approx(150 / 157)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    for tr in (small(), generate("64k", 40, seed=4, think_s=0.7), generate("32k", 30, seed=1)):
        p = tmp_path / "t.jsonl"
        save_jsonl(tr, p)
        back = load_jsonl(p)
        for col in ("offsets", "context", "append", "generated", "think_s"):
            x, y = getattr(tr, col), getattr(back, col)
            assert x.dtype == y.dtype and np.array_equal(x, y), col
        assert back.ids == list(range(tr.num_agents))
        save_jsonl(back, tmp_path / "again.jsonl")
        assert (tmp_path / "again.jsonl").read_bytes() == p.read_bytes()
    # Compacted turns carry an explicit context; others leave it to the default.
    first = json.loads(p.read_text().splitlines()[0])
    assert set(first) == {"id", "turns"}
    assert all(set(t) <= {"append", "generated", "context"} for t in first["turns"])


def test_jsonl_hand_written(tmp_path: Path) -> None:
    p = tmp_path / "hand.jsonl"
    p.write_text(
        '\n{"id": "a", "turns": [{"append": 10, "generated": 2}, {"append": 3, "generated": 1, "think_s": 1}]}\n'
        "   \n"
        '{"id": 7, "turns": [{"append": 4, "generated": 0, "context": 20}, {"append": 1, "generated": 1, "context": 0}]}\n'
    )
    tr = load_jsonl(p)
    assert tr.ids == ["a", 7]
    assert tr.context.tolist() == [0, 12, 20, 0]
    assert tr.think_s.tolist() == [0.0, 1.0, 0.0, 0.0]
    save_jsonl(tr, tmp_path / "out.jsonl")
    assert json.loads((tmp_path / "out.jsonl").read_text().splitlines()[1])["id"] == 7


GOOD = '{"id": 0, "turns": [{"append": 5, "generated": 1}]}'


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"id": 1, "turns": [', "bad JSON"),
        ("[1, 2]", "expected an object"),
        ('{"turns": [{"append": 1, "generated": 1}]}', r"missing \['id'\]"),
        ('{"id": 1}', r"missing \['turns'\]"),
        ('{"id": 1, "turns": [{"append": 1, "generated": 1}], "x": 0}', r"unknown \['x'\]"),
        (
            '{"id": 1.5, "turns": [{"append": 1, "generated": 1}]}',
            "id to be a string or an integer",
        ),
        ('{"id": 0, "turns": [{"append": 1, "generated": 1}]}', "id 0 already used on line 1"),
        ('{"id": 1, "turns": []}', "non-empty list"),
        ('{"id": 1, "turns": {}}', "non-empty list"),
        ('{"id": 1, "turns": [5]}', "turn 0: expected an object"),
        ('{"id": 1, "turns": [{"generated": 1}]}', r"turn 0: .*missing \['append'\]"),
        ('{"id": 1, "turns": [{"append": 1}]}', r"turn 0: .*missing \['generated'\]"),
        ('{"id": 1, "turns": [{"append": 1, "generated": 1, "ctx": 0}]}', r"unknown \['ctx'\]"),
        (
            '{"id": 1, "turns": [{"append": -1, "generated": 1}]}',
            "append to be a non-negative integer.*-1",
        ),
        (
            '{"id": 1, "turns": [{"append": 1, "generated": 2.0}]}',
            "generated to be a non-negative integer.*2.0",
        ),
        (
            '{"id": 1, "turns": [{"append": "3", "generated": 2}]}',
            "append to be a non-negative integer",
        ),
        (
            '{"id": 1, "turns": [{"append": true, "generated": 2}]}',
            "append to be a non-negative integer",
        ),
        (
            '{"id": 1, "turns": [{"append": 1, "generated": 2, "context": -4}]}',
            "context to be a non-negative",
        ),
        (
            '{"id": 1, "turns": [{"append": 1, "generated": 2}, {"append": 1, "generated": 1, "context": 4}]}',
            "turn 1: context 4 exceeds the previous turn's context \\+ append \\+ generated = 3",
        ),
        (
            '{"id": 1, "turns": [{"append": 1, "generated": 2, "think_s": -1}]}',
            "think_s to be finite",
        ),
        (
            '{"id": 1, "turns": [{"append": 1, "generated": 2, "think_s": "1"}]}',
            "think_s to be finite",
        ),
        (
            '{"id": 1, "turns": [{"append": 1, "generated": 2, "think_s": Infinity}]}',
            "think_s to be finite",
        ),
    ],
)
def test_jsonl_bad_input(tmp_path: Path, bad: str, message: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(GOOD + "\n\n" + bad + "\n" + GOOD.replace('"id": 0', '"id": 99') + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{message}"):
        load_jsonl(p)


def test_jsonl_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.jsonl: expected at least one trajectory"):
        load_jsonl(p)


@pytest.mark.slow
def test_generate_48k_agents() -> None:
    tr = generate("64k", 48_000, seed=0)
    assert tr.num_agents == 48_000 and tr.offsets.shape == (48_001,)
    n = tr.num_turns
    assert n == pytest.approx(48_000 * 157, rel=0.01)
    for col in ("context", "append", "generated", "think_s"):
        assert getattr(tr, col).shape == (n,)
    assert tr.stats()["max_context"] <= 65536
