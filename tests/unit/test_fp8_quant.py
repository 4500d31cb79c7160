"""Tile-wise E4M3 quantisation (report §3.3) against two independent references."""

import pytest
import torch

from megatron_dsv3.fp8 import (
    E4M3_MAX,
    BlockwiseFP8,
    quantize_1x128,
    quantize_128x1,
    quantize_128x128,
)

QUANTIZERS = {(1, 128): quantize_1x128, (128, 1): quantize_128x1, (128, 128): quantize_128x128}
# shapes with partial tiles in both dims, and exact multiples
SHAPES = [(5, 300), (130, 260), (256, 128), (1, 1)]


def codes_u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def reference_quantize(x: torch.Tensor, tile: tuple[int, int]):
    """Per-tile loop: scale = amax / 448 over the tile's valid elements, code = cast(x / scale)."""
    rows, cols = x.shape
    tr, tc = tile
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(-(-rows // tr), -(-cols // tc), dtype=torch.float32)
    for i, r0 in enumerate(range(0, rows, tr)):
        for j, c0 in enumerate(range(0, cols, tc)):
            block = x[r0 : r0 + tr, c0 : c0 + tc].float()
            s = block.abs().max() / 448.0
            scale[i, j] = s
            codes[r0 : r0 + tr, c0 : c0 + tc] = (block / s).to(torch.float8_e4m3fn)
    return codes, scale


@pytest.mark.parametrize("tile", list(QUANTIZERS))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_per_tile_loop_reference(tile, shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[1])  # tiles of very different ranges
    q = QUANTIZERS[tile](x)
    codes, scale = reference_quantize(x, tile)
    assert q.tile == tile and q.shape == shape and q.data.shape == shape
    assert torch.equal(q.scale, scale)
    assert torch.equal(codes_u8(q.data), codes_u8(codes))


# modelopt's block sizes: {dim: block}; a dim not named is not blocked (one scale per index)
MODELOPT_BLOCKS = {(1, 128): {-1: 128}, (128, 1): {-2: 128}, (128, 128): {-1: 128, -2: 128}}


@pytest.mark.parametrize("tile", list(QUANTIZERS))
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_matches_modelopt_block_quantizer(tile, shape):
    """nvidia-modelopt's real (not fake) FP8 block quantisation gives identical codes and scales.

    modelopt's `_scale` is amax / 448, the dequantisation multiplier, like ours; it pads
    partial blocks with zeros, so the partial tiles' amax is over valid elements too.
    """
    nn = pytest.importorskip("modelopt.torch.quantization.nn", reason="test extra nvidia-modelopt")
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    torch.manual_seed(1)
    x = torch.randn(shape) * torch.logspace(-2, 2, shape[1])
    quantizer = nn.TensorQuantizer(
        QuantizerAttributeConfig(num_bits=(4, 3), block_sizes=MODELOPT_BLOCKS[tile], fake_quant=False)
    )
    qtensor = quantizer(x)
    mo_codes, mo_scale = qtensor._quantized_data, quantizer._scale

    q = QUANTIZERS[tile](x)
    assert mo_codes.dtype == torch.float8_e4m3fn
    assert torch.equal(q.scale, mo_scale.reshape(q.scale.shape).float())
    assert torch.equal(codes_u8(q.data), codes_u8(mo_codes))


@pytest.mark.parametrize("tile", list(QUANTIZERS))
def test_pow2_scales_are_exact_powers_of_two_rounded_up(tile):
    torch.manual_seed(2)
    x = torch.randn(200, 300) * torch.logspace(-4, 4, 300)
    q = QUANTIZERS[tile](x, pow2_scale=True)
    mantissa, _ = torch.frexp(q.scale)
    assert torch.all(mantissa == 0.5)
    exact = QUANTIZERS[tile](x).scale
    assert torch.all(q.scale >= exact) and torch.all(q.scale < 2 * exact)
    assert q.data.float().abs().max() <= E4M3_MAX
    assert torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("tile", list(QUANTIZERS))
def test_zero_tiles_give_zero_codes_and_finite_scales(tile):
    torch.manual_seed(3)
    x = torch.randn(256, 256)
    x[:128, :128] = 0.0  # whole tiles of every tiling
    q = QUANTIZERS[tile](x)
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    deq = q.dequantize()
    assert torch.equal(deq[:128, :128], torch.zeros(128, 128))
    assert not torch.isnan(deq).any()

    q0 = QUANTIZERS[tile](torch.zeros(3, 200), pow2_scale=True)
    assert torch.equal(q0.scale, torch.ones_like(q0.scale))
    assert torch.equal(q0.dequantize(), torch.zeros(3, 200))


@pytest.mark.parametrize("tile", list(QUANTIZERS))
def test_outlier_stays_inside_its_tile(tile):
    torch.manual_seed(4)
    x = torch.randn(256, 384)
    x_out = x.clone()
    x_out[130, 200] *= 1000.0  # tile (1, 1) of 128x128, (130, 1) of 1x128, (1, 200) of 128x1
    deq, deq_out = QUANTIZERS[tile](x).dequantize(), QUANTIZERS[tile](x_out).dequantize()

    inside = torch.zeros_like(x, dtype=torch.bool)
    r0, c0 = (130 // tile[0]) * tile[0], (200 // tile[1]) * tile[1]
    inside[r0 : r0 + tile[0], c0 : c0 + tile[1]] = True
    assert torch.equal(deq[~inside], deq_out[~inside])
    assert not torch.equal(deq[inside], deq_out[inside])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_naming_the_tensor(bad):
    x = torch.randn(4, 256)
    x[1, 3] = bad
    x[2, 200] = bad
    with pytest.raises(ValueError, match=r"'layer3\.fc1 input'.*2 non-finite"):
        quantize_1x128(x, name="layer3.fc1 input")


def test_non_2d_input_raises():
    with pytest.raises(ValueError, match="'w' must be 2-D"):
        quantize_128x128(torch.randn(2, 3, 4), name="w")


@pytest.mark.parametrize("tile", list(QUANTIZERS))
@pytest.mark.parametrize("shape", [(1, 1), (3, 129), (127, 255), (129, 1000)])
def test_partial_tiles_round_trip(tile, shape):
    torch.manual_seed(5)
    x = torch.randn(shape) * 10
    q = QUANTIZERS[tile](x)
    assert q.data.shape == shape
    assert q.scale.shape == (-(-shape[0] // tile[0]), -(-shape[1] // tile[1]))
    # E4M3: half an ulp is <= 2**-4 relative for normals, <= 2**-10 * scale for subnormals
    err = (q.dequantize() - x).abs()
    bound = torch.maximum(x.abs() * 2.0**-4, q.expanded_scale() * 2.0**-10)
    assert torch.all(err <= bound)
    # the last (partial) tile's scale comes from its valid elements only
    tr, tc = tile
    last = x[(q.scale.shape[0] - 1) * tr :, (q.scale.shape[1] - 1) * tc :]
    assert q.scale[-1, -1] == last.abs().max() / E4M3_MAX


def test_128x1_is_the_transpose_of_1x128():
    torch.manual_seed(6)
    x = torch.randn(300, 70)
    cols = quantize_128x1(x).t()
    rows = quantize_1x128(x.t())
    assert cols.tile == rows.tile == (1, 128) and cols.shape == rows.shape
    assert torch.equal(cols.scale, rows.scale)
    assert torch.equal(codes_u8(cols.data), codes_u8(rows.data))


def test_blockwisefp8_checks_its_fields():
    with pytest.raises(ValueError, match="scale must be float32 of shape"):
        BlockwiseFP8(torch.zeros(4, 256, dtype=torch.float8_e4m3fn), torch.ones(4, 1), (1, 128), (4, 256))
