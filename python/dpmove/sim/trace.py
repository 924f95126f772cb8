"""Workload of ``dpmove sim``: agent trajectories as arrays of turns.

A trajectory is a sequence of turns. Turn ``t`` of an agent arrives with ``append`` new tokens
(user prompt or tool output); the model prefills them on top of ``context`` cached tokens (the
KV of the prefix reused from earlier turns), then decodes ``generated`` tokens; ``think_s``
seconds of tool/think time later the next turn arrives. All token counts are int64 tokens, all
times float64 seconds. Without compaction the next turn's context is this turn's
``context + append + generated``.

Synthetic traces (:func:`generate`) follow Table 2 of the DualPath paper (500 trajectories per
dataset). Its columns cannot all hold at once: context grows by ``append + generated`` per
turn, and e.g. 157 x (429 + 176) = 95K tokens exceeds the 64K window. The model used here:

* turns per trajectory: ``2 + floor(X)``, X lognormal (sigma ``TURNS_SIGMA``) truncated at
  ``TURNS_MAX_FACTOR x turns`` turns, its log-mean solved so the mean is ``turns``; drawn stratified (one draw per quantile band) so
  a few hundred agents already have the table's mean;
* turn 0 appends the first prompt (system prompt, tools, task): lognormal with mean
  ``first_prompt`` (sigma ``FIRST_SIGMA``); it is the knob that sets ``avg_context``;
* later turns append lognormal tokens (sigma ``APPEND_SIGMA``) and every turn generates
  lognormal tokens with mean ``generated`` (sigma ``GENERATED_SIGMA``); counts are rounded and
  clipped to ``>= 1``, appends to ``<= max_ctx // 4`` and generations to ``<= max_ctx // 8``;
* when a turn's ``context + append + generated`` would exceed ``max_ctx`` the agent *compacts*
  first: the context restarts from a summary of ``compact_tokens`` tokens, which is a cache
  miss (that turn's ``context`` is 0 and its ``append`` includes the summary). Hence no turn
  ever holds more than ``max_ctx`` tokens;
* the mean append of the later turns is solved (fluid model, :func:`_body_append`) so that the
  mean append over *all* turns, first prompts and summaries included, is the table's.

``first_prompt`` (7168 / 9216 / 10240 tokens for 32k / 48k / 64k) and ``compact_tokens``
(4096 for all) are in :data:`DATASETS`, calibrated on 20 seeds of 500 agents: turns, append,
generated and avg_context land within ~1 % of the table (about 2 % for a single 500-agent
trace). The hit rate follows: sum(context) / sum(context + append) is exactly
``1 - append / avg_context`` (96.5 / 98.1 / 98.7 %; the paper gives 98.7 % for 64k).
``total_tokens`` (the last turn's ``context + append + generated``, averaged over trajectories)
comes out at ~0.65 of the table. The table's values (~0.86 of the window) are below
``turns x (append + generated)``, so its trajectories must stop or be truncated near the window;
here a trajectory that outgrows the window compacts and goes on, so where it ends is anywhere
between the summary and ``max_ctx``. :func:`compare` reports it as it comes out.

Replay (:func:`save_jsonl`, :func:`load_jsonl`): one JSON object per line and trajectory::

    {"id": "a1", "turns": [{"append": 9000, "generated": 120},
                           {"append": 300, "generated": 80, "think_s": 1.5},
                           {"append": 2100, "generated": 64, "context": 0}]}

``context`` defaults to the previous turn's ``context + append + generated`` (0 for the first
turn), ``think_s`` to 0; other keys are errors. Blank lines are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np

__all__ = [
    "DATASETS",
    "AgentTurns",
    "DatasetStats",
    "Trace",
    "compare",
    "generate",
    "load_jsonl",
    "save_jsonl",
]

# Shape of the synthetic distributions (sigma of the underlying normal).
TURNS_SIGMA = 0.6
FIRST_SIGMA = 0.5
APPEND_SIGMA = 1.0
GENERATED_SIGMA = 0.8
# Longest trajectory, in multiples of the mean turn count. A real trace is finite (500
# trajectories); an unbounded tail would let one agent's sequential turns set the offline JCT.
TURNS_MAX_FACTOR = 2.5


@dataclasses.dataclass(frozen=True)
class DatasetStats:
    """One row of the paper's Table 2 (token counts; means per trajectory or per turn).

    ``first_prompt`` (mean turn-0 append) and ``compact_tokens`` (summary after a compaction)
    are model parameters of :func:`generate`, not table columns.
    """

    name: str
    max_ctx: int  # context window, tokens
    turns: float  # mean turns per trajectory
    append: float  # mean appended tokens per turn
    generated: float  # mean generated tokens per turn
    total_tokens: float  # mean final context per trajectory
    avg_context: float  # mean context + append per turn
    first_prompt: int = 8192
    compact_tokens: int = 4096


DATASETS: Dict[str, DatasetStats] = {
    d.name: d
    for d in (
        DatasetStats(
            "32k", 32768, 60, 608, 148, 28639, 17183, first_prompt=7168, compact_tokens=4096
        ),
        DatasetStats(
            "48k", 49152, 106, 474, 172, 42607, 25120, first_prompt=9216, compact_tokens=4096
        ),
        DatasetStats(
            "64k", 65536, 157, 429, 176, 55958, 32721, first_prompt=10240, compact_tokens=4096
        ),
    )
}


class AgentTurns(NamedTuple):
    """Views of one agent's turns (see :class:`Trace`)."""

    context: np.ndarray
    append: np.ndarray
    generated: np.ndarray
    think_s: np.ndarray


def _int_array(name: str, x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"Trace.{name}: expected a 1-D array, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"Trace.{name}: expected integer token counts, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.int64)
    if a.size and a.min() < 0:
        i = int(np.argmin(a))
        raise ValueError(f"Trace.{name}: expected non-negative counts, got {a[i]} at row {i}")
    return a


class Trace:
    """Turns of ``num_agents`` trajectories, agent-major, as flat arrays.

    ``offsets`` (int64, ``num_agents + 1``, strictly increasing from 0): agent ``i`` owns rows
    ``offsets[i]:offsets[i+1]``. Per row: ``context`` (cached prefix tokens before this turn's
    append), ``append``, ``generated`` (int64 tokens), ``think_s`` (float64 seconds between the
    end of this turn's decode and the next turn's arrival). ``context=None`` means no compaction:
    0 on each agent's first turn, then the previous ``context + append + generated``. An explicit
    ``context`` may be anything from 0 to the previous turn's total (on a first turn: any
    non-negative prefix, e.g. a shared system prompt). ``ids`` optionally names the agents.
    """

    __slots__ = ("append", "context", "generated", "ids", "offsets", "think_s")

    def __init__(
        self,
        offsets: Any,
        append: Any,
        generated: Any,
        context: Any = None,
        think_s: Any = None,
        ids: Optional[Sequence[Union[str, int]]] = None,
    ):
        off = _int_array("offsets", offsets)
        if off.size == 0 or off[0] != 0:
            raise ValueError("Trace.offsets: expected num_agents + 1 entries starting at 0")
        if off.size > 1 and np.any(np.diff(off) <= 0):
            i = int(np.argmax(np.diff(off) <= 0))
            raise ValueError(
                f"Trace.offsets: expected strictly increasing offsets (every agent has a turn), "
                f"agent {i} has {off[i + 1] - off[i]} turns"
            )
        n = int(off[-1])
        app = _int_array("append", append)
        gen = _int_array("generated", generated)
        for name, arr in (("append", app), ("generated", gen)):
            if arr.size != n:
                raise ValueError(f"Trace.{name}: expected {n} rows (offsets[-1]), got {arr.size}")
        first = off[:-1]
        if context is None:
            step = app + gen
            before = np.cumsum(step) - step  # tokens before each row, over all agents
            ctx = before - np.repeat(before[first], np.diff(off))
        else:
            ctx = _int_array("context", context)
            if ctx.size != n:
                raise ValueError(f"Trace.context: expected {n} rows (offsets[-1]), got {ctx.size}")
            if n > 1:
                bad = ctx[1:] > (ctx + app + gen)[:-1]
                bad[first[1:] - 1] = False  # a first turn has no previous turn
                if bad.any():
                    r = int(np.argmax(bad)) + 1
                    raise ValueError(
                        f"Trace.context: row {r} reuses {ctx[r]} cached tokens, expected at most "
                        f"the previous turn's context + append + generated = "
                        f"{ctx[r - 1] + app[r - 1] + gen[r - 1]}"
                    )
        if think_s is None:
            th = np.zeros(n, np.float64)
        else:
            th = np.ascontiguousarray(think_s, dtype=np.float64)
            if th.shape != (n,):
                raise ValueError(
                    f"Trace.think_s: expected {n} rows (offsets[-1]), got shape {th.shape}"
                )
            if n and not (np.all(np.isfinite(th)) and th.min() >= 0):
                raise ValueError("Trace.think_s: expected finite non-negative seconds")
        if ids is not None:
            ids = list(ids)
            if len(ids) != off.size - 1:
                raise ValueError(f"Trace.ids: expected {off.size - 1} ids, got {len(ids)}")
        self.offsets, self.context, self.append, self.generated = off, ctx, app, gen
        self.think_s, self.ids = th, ids

    @property
    def num_agents(self) -> int:
        return self.offsets.size - 1

    @property
    def num_turns(self) -> int:
        return int(self.offsets[-1])

    def agent(self, i: int) -> AgentTurns:
        """Views of agent ``i``'s turns (negative ``i`` counts from the end)."""
        if not -self.num_agents <= i < self.num_agents:
            raise IndexError(f"agent {i} out of range for {self.num_agents} agents")
        i %= self.num_agents
        s = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return AgentTurns(self.context[s], self.append[s], self.generated[s], self.think_s[s])

    def stats(self) -> Dict[str, float]:
        """Table 2 style statistics (tokens), plus the prefix hit rate and the peak context.

        turns: mean per trajectory; append, generated: mean per turn; avg_context: mean
        context + append per turn; total_tokens: mean over trajectories of the last turn's
        context + append + generated; hit_rate: sum(context) / sum(context + append);
        max_context: largest context + append + generated of any turn.
        """
        if self.num_agents == 0:
            raise ValueError("Trace.stats: expected at least one agent")
        full = self.context + self.append
        end = full + self.generated
        return {
            "turns": self.num_turns / self.num_agents,
            "append": float(self.append.mean()),
            "generated": float(self.generated.mean()),
            "avg_context": float(full.mean()),
            "total_tokens": float(end[self.offsets[1:] - 1].mean()),
            "hit_rate": float(self.context.sum() / max(int(full.sum()), 1)),
            "max_context": int(end.max()),
        }

    def _take(self, agents: np.ndarray) -> "Trace":
        lens = np.diff(self.offsets)[agents]
        off = np.zeros(agents.size + 1, np.int64)
        np.cumsum(lens, out=off[1:])
        # Rows of the chosen agents, in order: each agent's start repeated plus 0..len-1.
        rows = np.repeat(self.offsets[agents] - off[:-1], lens) + np.arange(off[-1])
        ids = None if self.ids is None else [self.ids[a] for a in agents]
        return Trace(
            off,
            self.append[rows],
            self.generated[rows],
            self.context[rows],
            self.think_s[rows],
            ids,
        )

    def subset(self, n: int) -> "Trace":
        """The first ``n`` agents (1 <= n <= num_agents)."""
        if not 1 <= n <= self.num_agents:
            raise ValueError(f"Trace.subset: expected 1 <= n <= {self.num_agents}, got {n}")
        return self._take(np.arange(n))

    def tile(self, n: int) -> "Trace":
        """``n`` agents: agents 0, 1, ..., num_agents - 1, 0, 1, ... (n >= 1).

        Copies share ids when ``ids`` is set; copy ``k`` of an agent is agent
        ``i + k * num_agents``.
        """
        if n < 1 or self.num_agents == 0:
            raise ValueError(f"Trace.tile: expected n >= 1 and a non-empty trace, got n={n}")
        return self._take(np.arange(n) % self.num_agents)

    def __repr__(self) -> str:
        return f"Trace(num_agents={self.num_agents}, num_turns={self.num_turns})"


def _dataset(dataset: Union[str, DatasetStats]) -> DatasetStats:
    if isinstance(dataset, DatasetStats):
        return dataset
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(
            f"unknown dataset {dataset!r}, expected one of {sorted(DATASETS)}"
        ) from None


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    """Lognormal samples with the given mean."""
    return rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma, size)


def _turns_pmf(turns: float) -> tuple:
    """Support and probabilities of ``2 + floor(X)``, X lognormal truncated so that no
    trajectory has more than ``TURNS_MAX_FACTOR x turns`` turns, its log-mean solved (bisection)
    so the mean is still ``turns``."""
    cap = max(int(TURNS_MAX_FACTOR * turns), 3)
    x = np.arange(cap - 1, dtype=np.float64)  # X in [x, x+1) -> T = x + 2 <= cap
    t = x[:-1] + 2

    def pmf(mu: float) -> np.ndarray:
        z = (np.log(np.maximum(x, 1e-300)) - mu) / (TURNS_SIGMA * math.sqrt(2))
        cdf = 0.5 * (1 + np.vectorize(math.erf)(z))
        cdf[0] = 0.0
        p = np.diff(cdf)
        return p / p.sum()

    lo, hi = math.log(0.5), math.log(cap)
    for _ in range(60):
        mid = (lo + hi) / 2
        if float((t * pmf(mid)).sum()) < turns:
            lo = mid
        else:
            hi = mid
    return t, pmf((lo + hi) / 2)


def _body_append(ds: DatasetStats, max_ctx: int) -> float:
    """Mean append of turns >= 1 such that the mean over all turns is ``ds.append``.

    Fluid model (every count at its mean): the first window holds ``k1`` turns, each later one
    ``k`` turns after a compaction, so a T-turn agent compacts ``ceil((T - k1) / k)`` times and
    appends ``first_prompt + (T - 1) * body + compactions * compact_tokens`` tokens.
    """
    t, p = _turns_pmf(ds.turns)
    mean_t = float((t * p).sum())
    body = ds.append
    for _ in range(20):
        r = body + ds.generated
        k1 = max(math.floor((max_ctx - ds.first_prompt - ds.generated) / r), 0) + 1
        k = max(math.floor((max_ctx - ds.compact_tokens) / r), 1)
        compactions = float((np.ceil(np.maximum(t - k1, 0) / k) * p).sum())
        body = (ds.append * mean_t - ds.first_prompt - compactions * ds.compact_tokens) / (
            mean_t - 1
        )
        if body < 1:
            raise ValueError(
                f"dataset {ds.name}: first_prompt={ds.first_prompt} and compact_tokens="
                f"{ds.compact_tokens} leave no room for a mean append of {ds.append} per turn"
            )
    return body


def generate(
    dataset: Union[str, DatasetStats],
    num_agents: int,
    seed: int = 0,
    max_ctx: Optional[int] = None,
    think_s: float = 0.0,
) -> Trace:
    """A synthetic trace of ``num_agents`` trajectories following ``dataset`` (module docstring).

    Deterministic for a given seed. ``max_ctx`` (tokens) overrides the dataset's window;
    ``think_s`` (seconds) is the mean of exponential think times (0: none). The token counts
    do not depend on ``think_s``.
    """
    ds = _dataset(dataset)
    m = int(ds.max_ctx if max_ctx is None else max_ctx)
    if num_agents < 1:
        raise ValueError(f"generate: expected num_agents >= 1, got {num_agents}")
    if not 0 <= think_s < math.inf:
        raise ValueError(f"generate: expected think_s >= 0 seconds, got {think_s}")
    cap_a, cap_g = m // 4, m // 8
    if ds.compact_tokens < 0 or ds.compact_tokens + cap_a + cap_g > m or ds.first_prompt < 1:
        raise ValueError(
            f"generate: expected 1 <= first_prompt and 0 <= compact_tokens <= max_ctx * 5/8 "
            f"(max_ctx={m}), got first_prompt={ds.first_prompt}, compact_tokens={ds.compact_tokens}"
        )
    body = _body_append(ds, m)
    rng = np.random.Generator(np.random.PCG64(seed))

    # Turn counts by stratified inverse-CDF sampling: one draw per 1/num_agents quantile band,
    # shuffled, so the trace's mean tracks ``turns`` even for a few hundred agents.
    support, pmf = _turns_pmf(ds.turns)
    u = (rng.permutation(num_agents) + rng.random(num_agents)) / num_agents
    pick = np.minimum(np.searchsorted(np.cumsum(pmf), u, side="right"), support.size - 1)
    lens = support[pick].astype(np.int64)
    off = np.zeros(num_agents + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    n = int(off[-1])
    first = off[:-1]

    app = np.clip(np.rint(_lognormal(rng, body, APPEND_SIGMA, n)), 1, cap_a).astype(np.int64)
    gen = np.clip(np.rint(_lognormal(rng, ds.generated, GENERATED_SIGMA, n)), 1, cap_g).astype(
        np.int64
    )
    app[first] = np.clip(
        np.rint(_lognormal(rng, ds.first_prompt, FIRST_SIGMA, num_agents)), 1, m - cap_g
    )

    # Turn t of all agents at once; agents sorted by length so the live ones are a prefix.
    ctx = np.zeros(n, np.int64)
    order = np.argsort(-lens, kind="stable")
    start = first[order]
    live = np.searchsorted(-lens[order], -np.arange(int(lens.max()) + 1), side="right")
    total = app[start] + gen[start]  # context + append + generated of the previous turn
    for t in range(1, lens.max()):
        k = live[t + 1]  # agents with more than t turns
        rows = start[:k] + t
        c, a = total[:k], app[rows]
        a_g = a + gen[rows]
        compact = c + a_g > m
        if compact.any():
            c = np.where(compact, 0, c)
            a = np.where(compact, a + ds.compact_tokens, a)
            a_g += np.where(compact, ds.compact_tokens, 0)
            app[rows] = a
        ctx[rows] = c
        total = c + a_g

    th = rng.exponential(think_s, n) if think_s > 0 else None
    return Trace(off, app, gen, ctx, th)


def compare(trace: Trace, dataset: Union[str, DatasetStats]) -> Dict[str, Dict[str, float]]:
    """Per Table 2 column: ``{"table": ..., "trace": ..., "ratio": trace / table}``.

    ``max_ctx`` compares the window with the trace's largest context + append + generated.
    """
    ds = _dataset(dataset)
    s = trace.stats()
    pairs = {
        "max_ctx": (ds.max_ctx, s["max_context"]),
        "turns": (ds.turns, s["turns"]),
        "append": (ds.append, s["append"]),
        "generated": (ds.generated, s["generated"]),
        "total_tokens": (ds.total_tokens, s["total_tokens"]),
        "avg_context": (ds.avg_context, s["avg_context"]),
    }
    return {
        k: {"table": float(a), "trace": float(b), "ratio": float(b) / a}
        for k, (a, b) in pairs.items()
    }


def save_jsonl(trace: Trace, path: Union[str, os.PathLike]) -> None:
    """Writes one line per agent; ``context`` only where it differs from the default chain and
    ``think_s`` only where nonzero, so :func:`load_jsonl` gives back the same arrays."""
    default = Trace(trace.offsets, trace.append, trace.generated).context
    with open(path, "w", encoding="utf-8") as f:
        for i in range(trace.num_agents):
            lo, hi = int(trace.offsets[i]), int(trace.offsets[i + 1])
            turns = []
            for r in range(lo, hi):
                turn: Dict[str, Any] = {
                    "append": int(trace.append[r]),
                    "generated": int(trace.generated[r]),
                }
                if trace.context[r] != default[r]:
                    turn["context"] = int(trace.context[r])
                if trace.think_s[r] != 0:
                    turn["think_s"] = float(trace.think_s[r])
                turns.append(turn)
            aid = i if trace.ids is None else trace.ids[i]
            f.write(json.dumps({"id": aid, "turns": turns}, separators=(",", ":")) + "\n")


_TURN_KEYS = {"append", "generated", "context", "think_s"}


def load_jsonl(path: Union[str, os.PathLike]) -> Trace:
    """Reads a trace written by :func:`save_jsonl` or by hand (format in the module docstring).

    Raises ValueError naming the file and line for bad JSON, missing or unknown keys, counts
    that are not non-negative integers, negative or non-finite think times, a context larger
    than the previous turn's context + append + generated, empty trajectories, repeated ids.
    """
    name = os.fspath(path)
    lens: List[int] = []
    cols: Dict[str, List[Any]] = {k: [] for k in ("context", "append", "generated", "think_s")}
    ids: List[Union[str, int]] = []
    seen: Dict[Union[str, int], int] = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON: {e}") from None
            if not isinstance(obj, dict):
                raise ValueError(f'{where}: expected an object {{"id": ..., "turns": [...]}}')
            missing, unknown = {"id", "turns"} - obj.keys(), obj.keys() - {"id", "turns"}
            if missing or unknown:
                raise ValueError(
                    f"{where}: expected keys id and turns, missing {sorted(missing)}, "
                    f"unknown {sorted(unknown)}"
                )
            aid = obj["id"]
            if isinstance(aid, bool) or not isinstance(aid, (str, int)):
                raise ValueError(f"{where}: expected id to be a string or an integer, got {aid!r}")
            if aid in seen:
                raise ValueError(f"{where}: id {aid!r} already used on line {seen[aid]}")
            seen[aid] = lineno
            turns = obj["turns"]
            if not isinstance(turns, list) or not turns:
                raise ValueError(f"{where}: expected turns to be a non-empty list")
            prev = 0  # previous turn's context + append + generated
            for t, turn in enumerate(turns):
                at = f"{where}: turn {t}"
                if not isinstance(turn, dict):
                    raise ValueError(f"{at}: expected an object with append and generated")
                missing, unknown = {"append", "generated"} - turn.keys(), turn.keys() - _TURN_KEYS
                if missing or unknown:
                    raise ValueError(
                        f"{at}: expected keys append, generated (optional context, "
                        f"think_s), missing {sorted(missing)}, unknown {sorted(unknown)}"
                    )
                for key in ("append", "generated", "context"):
                    v = turn.get(key, 0)
                    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**62:
                        raise ValueError(
                            f"{at}: expected {key} to be a non-negative integer (tokens), got {v!r}"
                        )
                ctx = turn.get("context", prev)
                if t and ctx > prev:
                    raise ValueError(
                        f"{at}: context {ctx} exceeds the previous turn's context + "
                        f"append + generated = {prev}"
                    )
                th = turn.get("think_s", 0.0)
                if (
                    isinstance(th, bool)
                    or not isinstance(th, (int, float))
                    or not (0 <= th < math.inf)
                ):
                    raise ValueError(
                        f"{at}: expected think_s to be finite non-negative seconds, got {th!r}"
                    )
                cols["context"].append(ctx)
                cols["append"].append(turn["append"])
                cols["generated"].append(turn["generated"])
                cols["think_s"].append(float(th))
                prev = ctx + turn["append"] + turn["generated"]
            lens.append(len(turns))
            ids.append(aid)
    if not lens:
        raise ValueError(f"{name}: expected at least one trajectory, found none")
    off = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    return Trace(
        off,
        np.array(cols["append"], np.int64),
        np.array(cols["generated"], np.int64),
        np.array(cols["context"], np.int64),
        np.array(cols["think_s"], np.float64),
        ids,
    )
