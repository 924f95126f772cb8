"""Calibration of ``dpmove sim``: the cluster's links and each model's compute timing.

One calibration serves every experiment. Each constant carries its source; "paper" means the
DualPath paper as summarised in shared/design/DUALPATH.md, "est." an estimate whose reasoning
is given next to it. Units: bytes, seconds, FLOPs; GB/s is 1e9 bytes per second.

Compute model of one GPU engine (a DP-attention rank of an EP group):

    prefill batch time = batch_overhead_s + sum_i new_i * (token_flops + pair_flops * (ctx_i + new_i / 2)) / prefill_flops
    attention time     = sum_i new_i * (attn_token_flops + pair_flops * (ctx_i + new_i / 2)) / prefill_flops
    decode step time   = step_base_s + step_per_seq_s * batch + step_per_ctx_token_s * sum(ctx)

``token_flops`` = 2 x active parameters + ``attn_token_flops`` (the context-independent part of
sparse attention); ``pair_flops`` is the work per (new token, cached token) pair (the DSA
indexer scans every cached token).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Tuple

from ..kv.model import ModelSpec, get_model

__all__ = ["ComputeModel", "ClusterSpec", "COMPUTE_MODELS", "get_compute_model", "calibration_table"]

GB = 1e9

# H100/H800 SXM effective dense prefill throughput per GPU, FLOP/s. Source: DeepSeek's published
# V3/R1 inference statistics (Open-Source Week day 6, Feb 2025): 73.7K input tokens/s per H800
# node in prefill with a 56.3 % cache hit rate -> 32.2K computed tokens/s per node = 4.0K per GPU;
# at ~80 GFLOP per token (2 x 37B active + short-context attention) that is ~320 TFLOP/s (32 %
# of the 989 TFLOP/s dense bf16 peak, 16 % of the fp8 peak).
HOPPER_PREFILL_FLOPS = 320e12

# Cache-compute ratio of DeepSeek-V3.2 at 32.7K context and 429 appended tokens: ~22 GB per
# PFLOP (paper, section 1). With 48,068 B of KV per token (kv.model preset) the turn loads
# 1.573 GB, so it computes 71.5 TFLOP = 166.6 GFLOP per new token. Of that, 74 GFLOP is
# 2 x 37B active parameters and ~35 GFLOP the top-2048 sparse attention (61 layers x 2048 keys
# x 128 heads x (576 + 512) dims x 2 FLOP, est.); the rest, 57.6 GFLOP over 32.7K cached
# tokens, is the per-pair term: 1.76 MFLOP per (new, cached) token pair.
_V32_ACTIVE = 37e9
_V32_ATTN_TOKEN = 35e9
_V32_PAIR = (1.573e9 / 22e9 * 1e15 / 429 - 2 * _V32_ACTIVE - _V32_ATTN_TOKEN) / 32_721


@dataclass(frozen=True)
class ComputeModel:
    """Timing of one model on one Hopper-class GPU engine (see the module docstring)."""

    name: str
    kv: ModelSpec                 # KV geometry: bytes per token, layers, block tokens
    token_flops: float            # FLOPs per new token independent of context
    attn_token_flops: float       # the attention share of token_flops (counted by the quota)
    pair_flops: float             # FLOPs per (new token, cached token) pair
    prefill_flops: float          # effective FLOP/s of one GPU in prefill
    batch_overhead_s: float       # fixed cost of one prefill forward pass
    step_base_s: float            # decode step floor (weights read + EP dispatch/combine)
    step_per_seq_s: float         # decode step cost per sequence in the batch
    step_per_ctx_token_s: float   # decode step cost per cached token of the batch (indexer scan)
    hbm_kv_bytes: float           # HBM left for KV on one GPU after weights and activations
    host_dram_bytes: float = 80e9  # host buffer per node of this deployment (paper sec. 8)
    sources: Tuple[Tuple[str, str], ...] = ()

    @property
    def bytes_per_token(self) -> int:
        return self.kv.bytes_per_token

    def kv_bytes(self, tokens: float) -> float:
        """Bytes of KV for `tokens` tokens (all layers)."""
        return tokens * self.kv.bytes_per_token

    def stored_tokens(self, tokens):
        """Tokens of a `tokens`-long prefix that sit in storage: only whole Full Blocks are
        stored (int or int array)."""
        b = self.kv.block_tokens
        return (tokens // b) * b

    def prefill_s(self, new: float, ctx: float) -> float:
        """Compute time of `new` tokens over `ctx` cached ones, excluding the batch overhead."""
        return new * (self.token_flops + self.pair_flops * (ctx + new / 2)) / self.prefill_flops

    def attention_s(self, new: float, ctx: float) -> float:
        """The attention part of prefill_s: what the 300 ms compute quota bounds."""
        return new * (self.attn_token_flops + self.pair_flops * (ctx + new / 2)) / self.prefill_flops

    def decode_step_s(self, batch: int, sum_ctx: float) -> float:
        """One decode step of `batch` sequences holding `sum_ctx` tokens of context in total."""
        if batch <= 0:
            return 0.0
        return self.step_base_s + self.step_per_seq_s * batch + self.step_per_ctx_token_s * sum_ctx

    def tokens_per_s(self, ctx: float) -> float:
        """New tokens one GPU prefills per second at context `ctx` (beta's unit)."""
        return self.prefill_flops / (self.token_flops + self.pair_flops * ctx)


_HBM = 80e9  # H100 SXM HBM3 capacity, bytes (NVIDIA datasheet)
_HBM_BW = 3.35e12  # H100 SXM HBM bandwidth, bytes/s (NVIDIA datasheet)


def _ds660b() -> ComputeModel:
    kv = get_model("deepseek-v3.2")
    return ComputeModel(
        name="ds-660b", kv=kv,
        token_flops=2 * _V32_ACTIVE + _V32_ATTN_TOKEN, attn_token_flops=_V32_ATTN_TOKEN,
        pair_flops=_V32_PAIR, prefill_flops=HOPPER_PREFILL_FLOPS,
        # 61 layers x ~0.3 ms of EP dispatch + combine latency that does not overlap (est.)
        batch_overhead_s=0.020,
        # Floor: 671 GB fp8 weights over EP32 = 21 GB per GPU read at 3.35 TB/s (6.3 ms) plus
        # 61 x 2 low-latency all-to-alls (~0.07 ms each, DeepEP) ~ 15 ms (est.). Per sequence:
        # sparse MLA over 2,048 keys x 61 layers and the MoE share; chosen once so that 64
        # sequences of 32K context step in ~36 ms, the TPOT the paper reports at its operating
        # point (section 8, 36-39 ms).
        step_base_s=0.015, step_per_seq_s=0.25e-3,
        # Indexer scan: 61 layers x 128 B fp8 key per cached token per step at 3.35 TB/s.
        step_per_ctx_token_s=61 * 128 / _HBM_BW,
        # 80 GB - 21 GB weights (EP32) - ~9 GB activations and communication buffers (est.)
        hbm_kv_bytes=_HBM - 21e9 - 9e9,
        sources=(
            ("prefill_flops", "DeepSeek V3/R1 inference overview: 4.0K computed tokens/s per H800 GPU"),
            ("token_flops", "2 x 37B active params + top-2048 sparse attention (est.)"),
            ("pair_flops", "paper sec. 1: 22 GB/PFLOP at 32.7K context, 429 appended"),
            ("step_*", "paper sec. 8: TPOT 36-39 ms at its operating point; H100 HBM 3.35 TB/s"),
        ),
    )


def _ds27b() -> ComputeModel:
    kv = get_model("ds-27b")
    frac = kv.num_layers / 61  # same attention geometry as V3.2 with 30 of its 61 layers
    active = 27e9 * 37 / 671   # V3's active fraction applied to 27B total (est.): 1.5B
    return ComputeModel(
        name="ds-27b", kv=kv,
        token_flops=2 * active + _V32_ATTN_TOKEN * frac, attn_token_flops=_V32_ATTN_TOKEN * frac,
        pair_flops=_V32_PAIR * frac, prefill_flops=HOPPER_PREFILL_FLOPS,
        batch_overhead_s=0.020 * frac,
        # 27 GB fp8 over EP8 = 3.4 GB per GPU (1 ms) + 30 x 2 all-to-alls (est.) ~ 6 ms floor;
        # per-sequence cost scaled by layers from ds-660b.
        step_base_s=0.006, step_per_seq_s=0.25e-3 * frac,
        step_per_ctx_token_s=30 * 128 / _HBM_BW,
        hbm_kv_bytes=_HBM - 3.4e9 - 9e9,
        sources=(
            ("geometry", "kv preset ds-27b: V3.2 attention, 30 layers"),
            ("active params", "27B x 37/671 (V3's active fraction), est."),
            ("prefill_flops", "as ds-660b"),
        ),
    )


def _qwen32b() -> ComputeModel:
    kv = get_model("qwen2.5-32b")
    # Dense GQA attention: per (new, cached) pair 64 layers x 40 heads x 128 dim x 2 (QK, PV) x 2 FLOP.
    pair = 64 * 40 * 128 * 2 * 2
    return ComputeModel(
        name="qwen2.5-32b", kv=kv,
        token_flops=2 * 32.8e9, attn_token_flops=0.0, pair_flops=pair,
        # bf16 dense model: ~40 % of the 989 TFLOP/s bf16 peak (est.)
        prefill_flops=400e12, batch_overhead_s=0.005,
        # 65.5 GB bf16 weights; an engine here is one GPU holding half of them (TP2, est.):
        # 32.8 GB read per step at 3.35 TB/s ~ 10 ms. Every cached token's K and V are read
        # once per step, all of them from this GPU's HBM (the KV it reserves).
        step_base_s=0.010, step_per_seq_s=0.1e-3,
        step_per_ctx_token_s=kv.bytes_per_token / _HBM_BW,
        hbm_kv_bytes=_HBM - 32.8e9 - 7e9,
        host_dram_bytes=320e9,  # paper sec. 8: 320 GB per node for Qwen
        sources=(("params", "Qwen2.5-32B model card: 32.8B params, 64 layers, 40 Q / 8 KV heads"),),
    )


COMPUTE_MODELS: Dict[str, ComputeModel] = {m.name: m for m in (_ds660b(), _ds27b(), _qwen32b())}
_ALIASES = {"deepseek-v3.2": "ds-660b", "ds660b": "ds-660b", "ds27b": "ds-27b", "qwen": "qwen2.5-32b",
            "qwen-32b": "qwen2.5-32b"}


def get_compute_model(name: str) -> ComputeModel:
    """The compute model called `name` (or an alias); ValueError listing the known ones."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in COMPUTE_MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(COMPUTE_MODELS)}")
    return COMPUTE_MODELS[key]


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster: P prefill and D decode nodes of `gpus_per_node` GPUs (one engine per GPU)."""

    p_nodes: int = 2
    d_nodes: int = 4
    gpus_per_node: int = 8
    # Compute NIC per GPU: 400 Gbps line rate (paper sec. 2); RDMA write goodput ~92 % of line
    # rate for large messages (ib_write_bw on ConnectX-7, est.).
    cnic_Bps: float = 50 * GB * 0.92
    # One storage NIC per node, 400 Gbps (paper sec. 2). Storage reads reach 58 % of the line
    # rate: 3FS's published read test gives 6.6 TiB/s over 500 clients with one 200 Gbps NIC each.
    snic_read_Bps: float = 50 * GB * (6.6 * 2**40 / 500) / (25 * GB)
    snic_write_Bps: float = 50 * GB * 0.5   # writes: replicated chain writes, half the line (est.)
    dram_bytes: float = 80 * GB             # host buffer per node (paper sec. 8, DeepSeek runs)
    mem_Bps: float = 500 * GB               # host memory bandwidth M (paper sec. 7)

    def __post_init__(self) -> None:
        for f in ("p_nodes", "d_nodes", "gpus_per_node"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ClusterSpec.{f} must be a positive int, got {v!r}")
        for f in ("cnic_Bps", "snic_read_Bps", "snic_write_Bps", "dram_bytes", "mem_Bps"):
            if not getattr(self, f) > 0:
                raise ValueError(f"ClusterSpec.{f} must be > 0, got {getattr(self, f)!r}")

    def with_nodes(self, p_nodes: int, d_nodes: int) -> "ClusterSpec":
        return dataclasses.replace(self, p_nodes=p_nodes, d_nodes=d_nodes)

    def pd_bounds(self) -> Tuple[float, float]:
        """Section 7: the P/D range in which dual-path loading adds no new bottleneck."""
        g = self.gpus_per_node
        s = self.snic_read_Bps / self.cnic_Bps  # storage bandwidth per node in units of B
        lo = s / (g - s)
        hi = min((g - 2 * s) / s, (g - s) / (2 * s), (self.mem_Bps / (self.cnic_Bps * s) - 3) / 2)
        return lo, hi


def calibration_table(model: ComputeModel, cluster: ClusterSpec) -> Dict[str, dict]:
    """Every constant with its unit and source, for the report."""
    c = cluster
    rows = {
        "cnic_Bps": (c.cnic_Bps, "B/s", "400 Gbps per GPU (paper sec. 2) x 0.92 RDMA goodput (est.)"),
        "snic_read_Bps": (c.snic_read_Bps, "B/s", "400 Gbps per node x 0.58: 3FS 6.6 TiB/s over 500 x 200 Gbps clients"),
        "snic_write_Bps": (c.snic_write_Bps, "B/s", "half the line rate (chain replication, est.)"),
        "dram_bytes": (c.dram_bytes, "B", "80 GB host buffer per node (paper sec. 8)"),
        "mem_Bps": (c.mem_Bps, "B/s", "M ~ 500 GB/s (paper sec. 7)"),
        "kv_bytes_per_token": (model.bytes_per_token, "B", f"kv preset {model.kv.name}"),
        "prefill_flops": (model.prefill_flops, "FLOP/s", dict(model.sources).get("prefill_flops", "")),
        "token_flops": (model.token_flops, "FLOP", dict(model.sources).get("token_flops", "")),
        "pair_flops": (model.pair_flops, "FLOP", dict(model.sources).get("pair_flops", "")),
        "batch_overhead_s": (model.batch_overhead_s, "s", "EP all-to-all latency per layer (est.)"),
        "step_base_s": (model.step_base_s, "s", "weights read + EP all-to-alls per step (est.)"),
        "step_per_seq_s": (model.step_per_seq_s, "s", dict(model.sources).get("step_*", "est.")),
        "step_per_ctx_token_s": (model.step_per_ctx_token_s, "s", "indexer key scan at 3.35 TB/s"),
        "hbm_kv_bytes": (model.hbm_kv_bytes, "B", "80 GB HBM - weights - activations (est.)"),
    }
    return {k: {"value": v, "unit": u, "source": s} for k, (v, u, s) in rows.items()}
