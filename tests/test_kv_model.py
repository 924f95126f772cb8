"""Model KV geometry (dpmove.kv.model) against values computed by hand.

DeepSeek-V3.2: 788 B per token per layer (656 B MLA latent + scales + rope, 132 B indexer key),
61 layers: 48,068 B per token; a 64-token Full Block is 3,076,352 B, its Layer Block 50,432 B,
and padded to 4 KiB it takes 752 pages = 3,080,192 B. DS-27B: the same with 30 layers.
Qwen2.5-32B: 8 KV heads x 128 x (K, V) x 2 B = 4,096 B per token per layer, 64 layers: 256 KiB
per token, 16 MiB Full Block, 256 KiB Layer Block.
"""

from __future__ import annotations

import numpy as np
import pytest
from dpmove.kv import PRESETS, ModelSpec, get_model

# name: (layers, B/token/layer, block tokens, B/token, Layer Block, Full Block, 4 KiB stride)
EXPECTED = {
    "deepseek-v3.2": (61, 788, 64, 48_068, 50_432, 3_076_352, 3_080_192),
    "ds-27b": (30, 788, 64, 23_640, 50_432, 1_512_960, 1_515_520),
    "qwen2.5-32b": (64, 4096, 64, 262_144, 262_144, 16 << 20, 16 << 20),
    "tiny": (2, 256, 4, 512, 1024, 2048, 4096),
    "tiny-odd": (3, 100, 5, 300, 500, 1500, 4096),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_presets(name: str) -> None:
    layers, bptl, bt, bpt, lb, fb, stride = EXPECTED[name]
    m = get_model(name)
    assert m is PRESETS[name] and m.name == name
    assert (m.num_layers, m.bytes_per_token_per_layer, m.block_tokens) == (layers, bptl, bt)
    assert m.bytes_per_token == bpt
    assert m.layer_block_bytes == lb
    assert m.full_block_bytes == fb
    assert m.full_block_shape == (layers, bt, bptl)
    assert int(np.prod(m.full_block_shape)) == fb
    assert m.full_block_stride() == stride
    assert m.full_block_stride(512) == -(-fb // 512) * 512
    assert m.full_block_stride(1) == fb
    assert [m.layer_block_offset(i) for i in (0, 1, layers - 1)] == [0, lb, (layers - 1) * lb]


def test_hand_values() -> None:
    ds = get_model("deepseek-v3.2")
    assert 512 + 16 + 128 + 128 + 4 == 788 == ds.bytes_per_token_per_layer
    assert ds.bytes_per_token == 48_068
    assert ds.full_block_bytes == 3_076_352 and ds.layer_block_bytes == 50_432
    assert ds.full_block_stride() == 3_080_192 == 752 * 4096
    assert get_model("ds-27b").num_layers == 30
    q = get_model("qwen2.5-32b")
    assert q.bytes_per_token_per_layer == 8 * 128 * 2 * 2 == 4096
    assert q.bytes_per_token == 256 << 10
    assert q.full_block_bytes == 16 << 20 and q.layer_block_bytes == 256 << 10
    # tiny-odd: nothing a power of two
    t = get_model("tiny-odd")
    assert (t.layer_block_bytes, t.full_block_bytes, t.full_block_stride()) == (500, 1500, 4096)


def test_get_model_case_and_block_tokens() -> None:
    assert get_model("DeepSeek-V3.2") is PRESETS["deepseek-v3.2"]
    m = get_model("deepseek-v3.2", 16)
    assert m.block_tokens == 16 and m.num_layers == 61
    assert m.layer_block_bytes == 788 * 16 == 12_608
    assert m.full_block_bytes == 48_068 * 16 == 769_088
    assert m.full_block_stride() == 770_048  # 188 pages
    assert PRESETS["deepseek-v3.2"].block_tokens == 64  # the preset is unchanged
    w = get_model("tiny").with_block_tokens(np.int64(6))
    assert w.block_tokens == 6 and type(w.block_tokens) is int
    assert w.full_block_bytes == 2 * 256 * 6
    assert w == ModelSpec("tiny", 2, 256, 6)


def test_staging_offsets() -> None:
    ds = get_model("deepseek-v3.2")
    stride = 3_080_192
    assert ds.staging_offset(0, 0) == 0
    assert ds.staging_offset(3, 60) == 3 * stride + 60 * 50_432 == 12_266_496
    assert ds.staging_offset(2, 1, stride=4 << 20) == 2 * (4 << 20) + 50_432
    rows = ds.layer_rows([5, 2, 7], 1)
    assert rows.dtype == np.int64 and rows.shape == (3, 2)
    np.testing.assert_array_equal(rows, [[5 * stride + 50_432, 0], [2 * stride + 50_432, 50_432],
                                         [7 * stride + 50_432, 2 * 50_432]])
    t = get_model("tiny-odd")
    np.testing.assert_array_equal(t.layer_rows(np.array([1, 0]), 2, stride=1500),
                                  [[1500 + 1000, 0], [1000, 500]])
    assert t.layer_rows([], 0).shape == (0, 2)
    # every Layer Block of a Full Block, back to back, is the Full Block
    buf = np.arange(2 * 4096, dtype=np.int64).astype(np.uint8)
    parts = [buf[o: o + t.layer_block_bytes] for o in (t.staging_offset(1, layer) for layer in range(3))]
    np.testing.assert_array_equal(np.concatenate(parts), buf[4096: 4096 + 1500])
    assert t.num_blocks(0) == 0 and t.num_blocks(14) == 2 and t.num_blocks(15) == 3


@pytest.mark.parametrize("call,exc,match", [
    (lambda: get_model("llama-9000"), ValueError, r"unknown model 'llama-9000'; known: deepseek-v3.2, ds-27b"),
    (lambda: get_model(""), ValueError, "unknown model"),
    (lambda: get_model(None), TypeError, "model name must be a string"),
    (lambda: get_model("tiny", 0), ValueError, "block_tokens must be a positive int"),
    (lambda: get_model("tiny", -4), ValueError, "block_tokens must be a positive int"),
    (lambda: get_model("tiny", 2.5), ValueError, "block_tokens must be a positive int"),
    (lambda: get_model("tiny", True), ValueError, "block_tokens must be a positive int"),
    (lambda: ModelSpec("x", 0, 10), ValueError, "num_layers must be a positive int"),
    (lambda: ModelSpec("x", -1, 10), ValueError, "num_layers must be a positive int"),
    (lambda: ModelSpec("x", 2, 0), ValueError, "bytes_per_token_per_layer must be a positive int"),
    (lambda: ModelSpec("x", 2, 10.0), ValueError, "bytes_per_token_per_layer must be a positive int"),
    (lambda: ModelSpec("x", 2, "10"), ValueError, "bytes_per_token_per_layer must be a positive int"),
    (lambda: ModelSpec("x", 2, 10, 0), ValueError, "block_tokens must be a positive int"),
    (lambda: ModelSpec("", 2, 10), ValueError, "name must be a non-empty string"),
    (lambda: get_model("tiny").full_block_stride(0), ValueError, "alignment"),
    (lambda: get_model("tiny").full_block_stride(-4096), ValueError, "alignment"),
    (lambda: get_model("tiny").num_blocks(-1), ValueError, "num_tokens"),
    (lambda: get_model("tiny").layer_block_offset(2), ValueError, r"layer must be in \[0, 2\)"),
    (lambda: get_model("tiny").layer_block_offset(-1), ValueError, "layer must be in"),
    (lambda: get_model("tiny").staging_offset(-1, 0), ValueError, "slot must be >= 0"),
    (lambda: get_model("tiny").staging_offset(0, 0, stride=2047), ValueError, "smaller than a Full Block"),
    (lambda: get_model("tiny").layer_rows([0, -1], 0), ValueError, "slots must be >= 0"),
    (lambda: get_model("tiny").layer_rows([0], 5), ValueError, "layer must be in"),
])
def test_bad_geometry(call, exc, match: str) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_spec_is_frozen_and_normalised() -> None:
    m = ModelSpec("n", np.int32(3), np.uint16(100), np.int64(5))
    assert type(m.num_layers) is int and m == get_model("tiny-odd").__class__("n", 3, 100, 5)
    with pytest.raises(AttributeError):
        m.num_layers = 4  # type: ignore[misc]
