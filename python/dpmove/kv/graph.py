"""Transfer graphs: the operations of one prefill request on the PE-read or DE-read path, as data.

A graph is a DAG of `Node`s in topological order (every dependency has a smaller id). It says
*what* moves, between which sides, in which order; it holds no engine, region or request, so
the executor (``dpmove.kv.executor``), the simulator and tests can all read the same graph.

The request: ``hit_blocks`` Full Blocks of cached KV (``hit_tokens = hit_blocks x block_tokens``
tokens), then ``new_tokens`` tokens the PE computes (prefill computes at least one token, so
``new_tokens >= 1``; ``hit_blocks == 0`` is a cold request: no load and no move node). The DE
host KV buffer holds the request's ``total_blocks = ceil((hit_tokens + new_tokens) /
block_tokens)`` blocks in Full Block layout: the hit blocks, then the new tokens' blocks (new
tokens start on a block boundary; the last block may be partial, its Layer Block rows are then
``last_block_tokens x bytes_per_token_per_layer`` bytes long).

Node kinds (DUALPATH.md section 3) and the side that issues them:

- ``load`` (side = read side): storage -> the read side's host memory, Full Blocks
  ``[first_block, end_block)`` of the hit blocks, one node per group of at most ``load_group``
  blocks. PE-read: into the PE host staging buffer; DE-read: straight into the DE KV buffer.
- ``h2d`` (PE-read, side ``pe``), one per layer: that layer's Layer Blocks of every hit block,
  PE host staging -> the PE GPU layer buffer (``hit_blocks x layer_block_bytes``).
- ``put`` (DE-read, side ``de``), one per layer: the same Layer Blocks, DE host KV buffer ->
  the PE GPU layer buffer over the network.
- ``compute`` (side ``pe``), one per layer: reads the layer buffer's hit KV and writes the new
  tokens' KV of that layer after it (``nbytes = new_tokens x bytes_per_token_per_layer``).
- ``return`` (side ``pe``), one per layer: PE GPU -> DE host KV buffer over the network, as
  Layer Block rows. PE-read: hit and new KV (blocks ``[0, total_blocks)``); DE-read: only the
  new tokens' KV (blocks ``[hit_blocks, total_blocks)``), since the hit KV is already there.

GPU layer buffers. A layer buffer holds one layer of the whole request, ``[total_tokens,
bytes_per_token_per_layer]`` contiguous: hit tokens then new tokens. Layerwise (the default),
the PE GPU has ``num_gpu_buffers`` of them (2: double buffering); layer ``l`` uses buffer
``l % num_gpu_buffers``, so the move of layer ``l + 1`` runs while layer ``l`` computes. A buffer
is reused only when the compute and the return of the layer that used it before are done: the
first node of layer ``l`` that touches the buffer (its move, or its compute when there is no
move) depends on ``compute[l - B]`` and ``return[l - B]`` explicitly. Non-layerwise ("Basic",
the paper's baseline) there is one buffer per layer and every layer is moved before the first
compute (``compute[0]`` depends on every move).

Other edges: every move depends on every load (layer ``l`` needs layer ``l`` of every hit
block, and a Full Block arrives whole); ``compute[l]`` on its move and on ``compute[l - 1]``
(layer order); ``return[l]`` on ``compute[l]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .model import ModelSpec

__all__ = ["KINDS", "READ_SIDES", "Node", "TransferGraph", "build_graph"]

KINDS = ("load", "h2d", "put", "compute", "return")
READ_SIDES = ("pe", "de")
DEFAULT_GPU_LAYER_BUFFERS = 2
DEFAULT_LOAD_GROUP = 16


@dataclass(frozen=True)
class Node:
    """One operation of a transfer graph.

    id: index in ``TransferGraph.nodes`` (topological order: every dep has a smaller id).
    kind: one of ``KINDS``. side: ``"pe"`` or ``"de"``, the side whose engine issues it.
    layer: the model layer (None for loads). buffer: the GPU layer buffer index it touches
    (None for loads). [first_block, end_block): the request's blocks it covers (loads, moves:
    hit blocks; compute: every block; return: the blocks it writes in the DE buffer).
    nbytes: payload bytes (moves and returns: bytes moved; loads: Full Block bytes read, not
    counting the store's padding; compute: bytes of new KV it writes). deps: ids it waits for.
    """

    id: int
    kind: str
    side: str
    layer: Optional[int]
    buffer: Optional[int]
    first_block: int
    end_block: int
    nbytes: int
    deps: Tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return self.end_block - self.first_block

    @property
    def name(self) -> str:
        """``load[0:16]``, ``h2d[L3]``, ``compute[L3]``, ..."""
        if self.layer is None:
            return f"{self.kind}[{self.first_block}:{self.end_block}]"
        return f"{self.kind}[L{self.layer}]"

    def to_dict(self) -> Dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "side": self.side, "layer": self.layer, "buffer": self.buffer,
                "blocks": [self.first_block, self.end_block], "nbytes": self.nbytes, "deps": list(self.deps),
                "name": self.name}


@dataclass(frozen=True)
class TransferGraph:
    """The DAG of one request; build it with ``build_graph``. Fields are the inputs, normalised;
    ``hit_keys`` is the tuple of block keys when the graph was built from keys, else None."""

    spec: ModelSpec
    read_side: str
    hit_blocks: int
    hit_keys: Optional[Tuple[bytes, ...]]
    new_tokens: int
    layerwise: bool
    num_gpu_buffers: int
    load_group: int
    nodes: Tuple[Node, ...]

    # --- geometry (bytes, tokens, blocks) ------------------------------------------------------
    @property
    def hit_tokens(self) -> int:
        return self.hit_blocks * self.spec.block_tokens

    @property
    def total_tokens(self) -> int:
        return self.hit_tokens + self.new_tokens

    @property
    def total_blocks(self) -> int:
        """Blocks of the DE KV buffer: the hit blocks, then ceil(new_tokens / block_tokens)."""
        return -(-self.total_tokens // self.spec.block_tokens)

    @property
    def last_block_tokens(self) -> int:
        """Tokens in the last block (block_tokens unless it is partial)."""
        return self.total_tokens - (self.total_blocks - 1) * self.spec.block_tokens

    @property
    def layer_bytes(self) -> int:
        """One GPU layer buffer: total_tokens x bytes_per_token_per_layer."""
        return self.total_tokens * self.spec.bytes_per_token_per_layer

    @property
    def hit_layer_bytes(self) -> int:
        """The hit part at the start of a layer buffer: hit_tokens x bytes_per_token_per_layer."""
        return self.hit_tokens * self.spec.bytes_per_token_per_layer

    @property
    def new_layer_bytes(self) -> int:
        """The new part after it: new_tokens x bytes_per_token_per_layer."""
        return self.new_tokens * self.spec.bytes_per_token_per_layer

    def block_tokens_of(self, block: int) -> int:
        """Tokens held by block `block` of the request (the last one may be partial)."""
        if not 0 <= block < self.total_blocks:
            raise ValueError(f"block must be in [0, {self.total_blocks}), got {block}")
        return self.last_block_tokens if block == self.total_blocks - 1 else self.spec.block_tokens

    # --- nodes ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    @property
    def move_kind(self) -> str:
        """``"h2d"`` (PE-read) or ``"put"`` (DE-read): how hit KV reaches the PE GPU."""
        return "h2d" if self.read_side == "pe" else "put"

    def nodes_of(self, kind: str) -> Tuple[Node, ...]:
        """The nodes of one kind, in id order (per-layer kinds: layer order)."""
        if kind not in KINDS:
            raise ValueError(f"unknown node kind {kind!r}; known: {', '.join(KINDS)}")
        return tuple(n for n in self.nodes if n.kind == kind)

    def node(self, kind: str, layer: int) -> Node:
        """The per-layer node of `kind` for `layer`; KeyError when the graph has none (e.g. no
        move node without hit blocks)."""
        for n in self.nodes:
            if n.kind == kind and n.layer == layer:
                return n
        raise KeyError(f"no {kind} node for layer {layer} in this graph")

    def dependents(self) -> Tuple[Tuple[int, ...], ...]:
        """For every node id, the ids that depend on it (the reverse edges)."""
        out: List[List[int]] = [[] for _ in self.nodes]
        for n in self.nodes:
            for d in n.deps:
                out[d].append(n.id)
        return tuple(tuple(x) for x in out)

    def bytes_by_kind(self) -> Dict[str, int]:
        """Payload bytes per kind (every kind present, 0 where the graph has no such node)."""
        out = dict.fromkeys(KINDS, 0)
        for n in self.nodes:
            out[n.kind] += n.nbytes
        return out

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (JSON-serialisable; keys as hex strings)."""
        return {
            "model": self.spec.name, "read_side": self.read_side, "hit_blocks": self.hit_blocks,
            "hit_keys": None if self.hit_keys is None else [k.hex() for k in self.hit_keys],
            "new_tokens": self.new_tokens, "total_tokens": self.total_tokens, "total_blocks": self.total_blocks,
            "layerwise": self.layerwise, "num_gpu_buffers": self.num_gpu_buffers, "load_group": self.load_group,
            "bytes": self.bytes_by_kind(), "nodes": [n.to_dict() for n in self.nodes],
        }

    def describe(self) -> str:
        """One line per node: id, name, side, buffer, blocks, bytes, deps."""
        mode = "layerwise" if self.layerwise else "non-layerwise"
        head = (f"{self.read_side.upper()}-read {self.spec.name}: {self.hit_blocks} hit blocks + {self.new_tokens} new "
                f"tokens ({self.total_blocks} blocks), {mode}, {self.num_gpu_buffers} GPU layer buffer(s), "
                f"{len(self.nodes)} nodes")
        lines = [head]
        for n in self.nodes:
            buf = "-" if n.buffer is None else str(n.buffer)
            lines.append(f"{n.id:5d}  {n.name:<14} {n.side}  buf {buf:>2}  blocks [{n.first_block}:{n.end_block})  "
                         f"{n.nbytes:>12} B  deps {list(n.deps)}")
        return "\n".join(lines)


def _positive_int(name: str, v: Any, minimum: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(v)}")
    return int(v)


def _hit_input(hit_blocks: Any) -> Tuple[int, Optional[Tuple[bytes, ...]]]:
    if isinstance(hit_blocks, (bytes, bytearray, memoryview)):
        raise TypeError("hit_blocks is one key; pass a sequence of keys (e.g. [key]) or a block count")
    if isinstance(hit_blocks, str):
        raise TypeError("hit_blocks must be a block count or a sequence of bytes keys, got a str")
    if isinstance(hit_blocks, (int, np.integer)) and not isinstance(hit_blocks, (bool, np.bool_)):
        return _positive_int("hit_blocks", hit_blocks, 0), None
    if isinstance(hit_blocks, Sequence):
        keys = []
        for i, k in enumerate(hit_blocks):
            if not isinstance(k, (bytes, bytearray, memoryview)):
                raise TypeError(f"hit_blocks[{i}] must be a bytes key, got {type(k).__name__}")
            keys.append(bytes(k))
        return len(keys), tuple(keys)
    raise TypeError("hit_blocks must be a block count (int) or a sequence of bytes keys, got "
                    f"{type(hit_blocks).__name__}")


def build_graph(
    spec: ModelSpec,
    hit_blocks: Union[int, Sequence[bytes]],
    new_tokens: int,
    read_side: str,
    *,
    layerwise: bool = True,
    gpu_layer_buffers: Optional[int] = None,
    load_group: int = DEFAULT_LOAD_GROUP,
) -> TransferGraph:
    """The transfer graph of one request (see the module docstring for nodes and edges).

    spec: the model's KV geometry. hit_blocks: the cached prefix, as a block count (>= 0) or
    the block keys in prefix order (the executor needs keys). new_tokens: tokens to compute
    (>= 1). read_side: ``"pe"`` or ``"de"``. layerwise: stream layer by layer through
    ``gpu_layer_buffers`` GPU layer buffers (None: 2; more than num_layers is clamped to
    num_layers); False: the Basic baseline, one buffer per layer and every layer moved before
    the first compute (gpu_layer_buffers must then be None or >= num_layers). load_group: most
    blocks per load node (>= 1).

    Raises TypeError / ValueError naming the argument and what was expected.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a dpmove.kv.ModelSpec, got {type(spec).__name__}")
    num_hit, keys = _hit_input(hit_blocks)
    new_tokens = _positive_int("new_tokens (prefill computes at least one token)", new_tokens, 1)
    if not isinstance(read_side, str):
        raise TypeError(f"read_side must be 'pe' or 'de', got {type(read_side).__name__}")
    if read_side not in READ_SIDES:
        raise ValueError(f"unknown read side {read_side!r}; expected 'pe' (PE-read) or 'de' (DE-read)")
    if not isinstance(layerwise, (bool, np.bool_)):
        raise TypeError(f"layerwise must be a bool, got {type(layerwise).__name__}")
    layerwise = bool(layerwise)
    load_group = _positive_int("load_group", load_group, 1)
    num_layers = spec.num_layers
    if layerwise:
        b = (DEFAULT_GPU_LAYER_BUFFERS if gpu_layer_buffers is None
             else _positive_int("gpu_layer_buffers", gpu_layer_buffers, 1))
        num_buffers = min(b, num_layers)
    else:
        if gpu_layer_buffers is not None:
            b = _positive_int("gpu_layer_buffers", gpu_layer_buffers, 1)
            if b < num_layers:
                raise ValueError(f"layerwise=False keeps every layer on the GPU: gpu_layer_buffers must be None or >= "
                                 f"num_layers ({num_layers}), got {b}")
        num_buffers = num_layers

    lb = spec.layer_block_bytes
    bpt = spec.bytes_per_token_per_layer
    hit_tokens = num_hit * spec.block_tokens
    total_tokens = hit_tokens + new_tokens
    total_blocks = -(-total_tokens // spec.block_tokens)
    move_kind = "h2d" if read_side == "pe" else "put"
    move_side = "pe" if read_side == "pe" else "de"

    nodes: List[Node] = []

    def add(kind: str, side: str, layer: Optional[int], buffer: Optional[int], blocks: Tuple[int, int], nbytes: int,
            deps: Sequence[int]) -> int:
        nid = len(nodes)
        assert all(0 <= d < nid for d in deps)
        nodes.append(Node(nid, kind, side, layer, buffer, blocks[0], blocks[1], nbytes, tuple(sorted(set(deps)))))
        return nid

    loads = [add("load", read_side, None, None, (b0, min(b0 + load_group, num_hit)),
                 (min(b0 + load_group, num_hit) - b0) * spec.full_block_bytes, ())
             for b0 in range(0, num_hit, load_group)]

    move: Dict[int, int] = {}
    compute: Dict[int, int] = {}
    ret: Dict[int, int] = {}
    ret_first = 0 if read_side == "pe" else num_hit
    ret_bytes = (total_tokens if read_side == "pe" else new_tokens) * bpt

    def reuse_deps(layer: int) -> List[int]:
        # The previous user of this layer's buffer must have computed and returned.
        prev = layer - num_buffers
        return [compute[prev], ret[prev]] if prev >= 0 else []

    if not layerwise and num_hit:
        for layer in range(num_layers):
            move[layer] = add(move_kind, move_side, layer, layer, (0, num_hit), num_hit * lb, loads)
    for layer in range(num_layers):
        buf = layer % num_buffers
        if layerwise and num_hit:
            move[layer] = add(move_kind, move_side, layer, buf, (0, num_hit), num_hit * lb, loads + reuse_deps(layer))
        deps = [compute[layer - 1]] if layer else []
        if num_hit:
            # Basic: compute[0] waits for every layer's move; later layers follow through compute[0].
            deps += list(move.values()) if not layerwise and layer == 0 else [move[layer]]
        else:
            deps += reuse_deps(layer)
        compute[layer] = add("compute", "pe", layer, buf, (0, total_blocks), new_tokens * bpt, deps)
        ret[layer] = add("return", "pe", layer, buf, (ret_first, total_blocks), ret_bytes, [compute[layer]])

    return TransferGraph(spec=spec, read_side=read_side, hit_blocks=num_hit, hit_keys=keys, new_tokens=new_tokens,
                         layerwise=layerwise, num_gpu_buffers=num_buffers, load_group=load_group, nodes=tuple(nodes))
