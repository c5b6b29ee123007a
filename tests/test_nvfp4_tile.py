"""The in-kernel NVFP4 tile reader (nvfp4_tile.py) equals the package dequantiser without global scale."""

import importlib

import pytest
import torch
import triton
import triton.language as tl

from .helpers import msa

pytestmark = pytest.mark.kernels_ci


_nvfp4_tile = importlib.import_module(msa.__name__ + ".nvfp4_tile").nvfp4_tile


@triton.jit
def _read_rows(P, S, ROWS, OUT, n, s_row, sd, N: tl.constexpr, D: tl.constexpr):
    i = tl.arange(0, N)
    ok = i < n
    r = tl.load(ROWS + i, mask=ok, other=0).to(tl.int64)
    x = _nvfp4_tile(P, S, r * s_row, r, ok, sd, N, D, tl.float32)
    tl.store(OUT + i[:, None] * D + tl.arange(0, D)[None, :], x)


@pytest.mark.parametrize("shape", [(37, 2, 128), (5, 3, 128, 128)])
def test_tile_matches_dequantiser(device, shape):
    x = torch.randn(shape, device=device, dtype=torch.float32).to(torch.float16 if device.type == "cpu" else torch.bfloat16)
    x[..., :16] *= 1e-3  # small blocks: subnormal scales
    qx = msa.quantize_bf16_to_nvfp4_128x4(x)
    ref = msa.dequantize_nvfp4_128x4_to_bf16(qx, include_global_scale=False).float().reshape(-1, 128)
    R = ref.shape[0]
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, R, (24,), generator=g).to(torch.int32).to(device)
    n = 21  # last 3 tile rows masked
    out = torch.full((32, 128), float("nan"), device=device)
    data = qx.data.reshape(R, 64)
    _read_rows[(1,)](data, qx.scale_128x4, rows, out, n, data.stride(0), data.stride(1), N=32, D=128)
    assert torch.equal(out[:n], ref[rows[:n].long()])
    assert torch.equal(out[n:], torch.zeros_like(out[n:]))


_tile_mod = importlib.import_module(msa.__name__ + ".nvfp4_tile")


@triton.jit
def _read_rows_f16(P, S, ROWS, OUT, n, s_row, sd, N: tl.constexpr, D: tl.constexpr, FP4_DEC: tl.constexpr):
    i = tl.arange(0, N)
    ok = i < n
    r = tl.load(ROWS + i, mask=ok, other=0).to(tl.int64)
    x = _tile_mod.nvfp4_tile_f16(P, S, r * s_row, r, ok, sd, N, D, FP4_DEC)
    tl.store(OUT + i[:, None] * D + tl.arange(0, D)[None, :], x)


@pytest.mark.parametrize("dec", [0, 1])
@pytest.mark.parametrize("shape", [(37, 2, 128), (5, 3, 128, 128)])
def test_tile_f16_matches_dequantiser(device, shape, dec):
    """fp16 tiles (the attention kernels' operand) hold e2m1*scale / FP4_POW2 bit for bit (both decoders)."""
    if dec == 1 and device.type != "cuda":
        pytest.skip("inline-PTX decoder: GPU only")
    x = torch.randn(shape, device=device, dtype=torch.float32).to(torch.float16 if device.type == "cpu" else torch.bfloat16)
    x[..., :16] *= 1e-3  # small blocks: subnormal scales
    x[..., 16:32] *= 300.0  # large scales
    qx = msa.quantize_bf16_to_nvfp4_128x4(x)
    ref = msa.dequantize_nvfp4_128x4_to_bf16(qx, include_global_scale=False).float().reshape(-1, 128)
    R = ref.shape[0]
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, R, (24,), generator=g).to(torch.int32).to(device)
    n = 21
    out = torch.full((32, 128), float("nan"), device=device, dtype=torch.float16)
    data = qx.data.reshape(R, 64)
    _read_rows_f16[(1,)](data, qx.scale_128x4, rows, out, n, data.stride(0), data.stride(1), N=32, D=128, FP4_DEC=dec)
    assert torch.equal(out[:n].float() * _tile_mod.FP4_POW2.value, ref[rows[:n].long()])
    assert torch.equal(out[n:], torch.zeros_like(out[n:]))
