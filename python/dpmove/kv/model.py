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
- DS-27B-like: the same attention geometry with 30 layers: 23,640 B per token.
- Qwen2.5-32B (64 layers, GQA 8 KV heads, head dim 128, bf16 K and V):
  8 x 128 x 2 (K, V) x 2 B = 4,096 B per layer; 262,144 B (256 KiB) per token;
  Full Block 16 MiB; Layer Block 256 KiB.
- tiny: 2 layers x 256 B, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

__all__ = ["ModelSpec", "PRESETS", "get_model"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    bytes_per_token_per_layer: int
    block_tokens: int = 64

    def __post_init__(self) -> None:
        for field in ("num_layers", "bytes_per_token_per_layer", "block_tokens"):
            v = getattr(self, field)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelSpec.{field} must be a positive int, got {v!r}")

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.bytes_per_token_per_layer

    @property
    def layer_block_bytes(self) -> int:
        """One layer of one block: block_tokens x bytes_per_token_per_layer."""
        return self.block_tokens * self.bytes_per_token_per_layer

    @property
    def full_block_bytes(self) -> int:
        """All layers of one block: num_layers x layer_block_bytes."""
        return self.num_layers * self.layer_block_bytes

    def full_block_stride(self, alignment: int = 4096) -> int:
        """Bytes a Full Block occupies on storage: rounded up to `alignment` for O_DIRECT."""
        if alignment <= 0:
            raise ValueError("alignment must be > 0 bytes")
        return -(-self.full_block_bytes // alignment) * alignment

    def layer_block_offset(self, layer: int) -> int:
        """Byte offset of `layer`'s Layer Block inside a Full Block."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        return layer * self.layer_block_bytes


PRESETS: Dict[str, ModelSpec] = {
    "deepseek-v3.2": ModelSpec("deepseek-v3.2", num_layers=61, bytes_per_token_per_layer=788),
    "ds-27b": ModelSpec("ds-27b", num_layers=30, bytes_per_token_per_layer=788),
    "qwen2.5-32b": ModelSpec("qwen2.5-32b", num_layers=64, bytes_per_token_per_layer=4096),
    "tiny": ModelSpec("tiny", num_layers=2, bytes_per_token_per_layer=256, block_tokens=4),
}


def get_model(name: str) -> ModelSpec:
    """The preset called `name` (case-insensitive); ValueError listing the known ones."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]
