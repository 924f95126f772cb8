"""Model KV geometry.

A Full Block is ``[num_layers, block_tokens, bytes_per_token_per_layer]`` bytes: every layer of
``block_tokens`` consecutive tokens, the concatenation of its Layer Blocks (one layer each), so
storage always holds Full Blocks and streaming moves Layer Blocks with no layout change.

Derivations of the presets (bytes per token per layer):

- DeepSeek-V3.2 (61 layers, MLA with the DSA indexer), FP8 KV cache as stored by FlashMLA:
  latent 512 x fp8 (512 B) + 4 fp32 tile scales (16 B) + rope 64 x bf16 (128 B) = 656 B,
  plus the indexer key 128 x fp8 (128 B) + one fp32 scale (4 B) = 132 B; 788 B in all.
  Per token 788 x 61 = 48,068 B (~48 KB); 64-token Full Block 3,076,352 B (~3.1 MB);
  Layer Block 50,432 B (~50 KB).
- DS-27B-like: the same attention geometry with 30 layers: 23,640 B per token; Full Block
  1,512,960 B; Layer Block 50,432 B.
- Qwen2.5-32B (64 layers, GQA 8 KV heads, head dim 128, bf16 K and V):
  8 x 128 x 2 (K, V) x 2 B = 4,096 B per layer; 262,144 B (256 KiB) per token;
  Full Block 16 MiB; Layer Block 256 KiB.
- Test specs: ``tiny`` (2 layers x 256 B, 4-token blocks: Full Block 2 KiB) and ``tiny-odd``
  (3 layers x 100 B, 5-token blocks: Full Block 1,500 B, nothing a power of two, so offset and
  padding mistakes show).

Host staging buffers hold Full Blocks at a fixed stride (the store's read size: the Full Block
rounded up for O_DIRECT, see ``BlockStore.slot_bytes``); Layer Block ``layer`` of the block in
slot ``s`` is then at ``s * stride + layer * layer_block_bytes``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

__all__ = ["ModelSpec", "PRESETS", "get_model"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    bytes_per_token_per_layer: int
    block_tokens: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelSpec.name must be a non-empty string, got {self.name!r}")
        for field in ("num_layers", "bytes_per_token_per_layer", "block_tokens"):
            v = getattr(self, field)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelSpec.{field} must be a positive int, got {v!r}")
            object.__setattr__(self, field, int(v))

    def with_block_tokens(self, block_tokens: int) -> "ModelSpec":
        """The same model with another block size (tokens per block)."""
        return dataclasses.replace(self, block_tokens=block_tokens)

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token over all layers."""
        return self.num_layers * self.bytes_per_token_per_layer

    @property
    def layer_block_bytes(self) -> int:
        """One layer of one block: block_tokens x bytes_per_token_per_layer."""
        return self.block_tokens * self.bytes_per_token_per_layer

    @property
    def full_block_bytes(self) -> int:
        """All layers of one block: num_layers x layer_block_bytes."""
        return self.num_layers * self.layer_block_bytes

    @property
    def full_block_shape(self) -> "tuple[int, int, int]":
        """(num_layers, block_tokens, bytes_per_token_per_layer): a Full Block as a uint8 array."""
        return (self.num_layers, self.block_tokens, self.bytes_per_token_per_layer)

    def full_block_stride(self, alignment: int = 4096) -> int:
        """Bytes a Full Block occupies when padded to `alignment` (O_DIRECT)."""
        if not isinstance(alignment, (int, np.integer)) or alignment <= 0:
            raise ValueError(f"alignment must be a positive number of bytes, got {alignment!r}")
        return -(-self.full_block_bytes // alignment) * alignment

    def num_blocks(self, num_tokens: int) -> int:
        """Full Blocks that `num_tokens` tokens fill completely (a partial last block is not one)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return num_tokens // self.block_tokens

    def layer_block_offset(self, layer: int) -> int:
        """Byte offset of `layer`'s Layer Block inside a Full Block."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        return layer * self.layer_block_bytes

    def staging_offset(self, slot: int, layer: int, stride: Optional[int] = None) -> int:
        """Byte offset of `layer`'s Layer Block of the Full Block in staging slot `slot`, in a
        host buffer of Full Blocks `stride` bytes apart (default: full_block_stride())."""
        stride = self.full_block_stride() if stride is None else stride
        if stride < self.full_block_bytes:
            raise ValueError(f"stride {stride} B is smaller than a Full Block ({self.full_block_bytes} B)")
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        return slot * stride + self.layer_block_offset(layer)

    def layer_rows(self, slots: "np.ndarray | list[int]", layer: int, stride: Optional[int] = None) -> np.ndarray:
        """(N, 2) int64 rows of (staging offset, layer offset): where `layer`'s Layer Block of each
        Full Block in `slots` lies in a staging buffer of `stride`, and where it goes in a buffer
        holding only that layer for those blocks back to back ([N, block_tokens, bpt])."""
        stride = self.full_block_stride() if stride is None else stride
        s = np.asarray(slots, dtype=np.int64).reshape(-1)
        base = self.staging_offset(0, layer, stride)
        if s.size and int(s.min()) < 0:
            raise ValueError("slots must be >= 0")
        return np.stack([s * stride + base, np.arange(s.size, dtype=np.int64) * self.layer_block_bytes], axis=1)


PRESETS: Dict[str, ModelSpec] = {
    "deepseek-v3.2": ModelSpec("deepseek-v3.2", num_layers=61, bytes_per_token_per_layer=788),
    "ds-27b": ModelSpec("ds-27b", num_layers=30, bytes_per_token_per_layer=788),
    "qwen2.5-32b": ModelSpec("qwen2.5-32b", num_layers=64, bytes_per_token_per_layer=4096),
    "tiny": ModelSpec("tiny", num_layers=2, bytes_per_token_per_layer=256, block_tokens=4),
    "tiny-odd": ModelSpec("tiny-odd", num_layers=3, bytes_per_token_per_layer=100, block_tokens=5),
}


def get_model(name: str, block_tokens: Optional[int] = None) -> ModelSpec:
    """The preset called `name` (case-insensitive), optionally with another block size;
    ValueError listing the known ones."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}")
    spec = PRESETS[key]
    return spec if block_tokens is None else spec.with_block_tokens(block_tokens)
