"""KV-cache layer: model geometry (Full Blocks, Layer Blocks), the block store (Full Blocks on
files behind a prefix trie of chained block hashes) and layer-block transfer graphs."""

from .executor import ComputeContext, ExecutionError, GraphExecutor, RunResult, Timeline
from .graph import Node, TransferGraph, build_graph
from .model import PRESETS, ModelSpec, get_model
from .store import (
    PUT_EXISTS,
    PUT_NO_PARENT,
    PUT_STORED,
    ROOT,
    BlockCorrupt,
    BlockMissing,
    BlockRead,
    BlockStore,
    IndexCorrupt,
    Lookup,
    StoreError,
    StoreFull,
    chain_keys,
)

__all__ = [
    "ModelSpec", "PRESETS", "get_model",
    "BlockStore", "BlockRead", "Lookup", "chain_keys", "ROOT",
    "PUT_STORED", "PUT_EXISTS", "PUT_NO_PARENT",
    "StoreError", "StoreFull", "BlockCorrupt", "BlockMissing", "IndexCorrupt",
    "build_graph", "TransferGraph", "Node",
    "GraphExecutor", "RunResult", "ComputeContext", "ExecutionError", "Timeline",
]
