"""NVFP4 quantise / dequantise / swizzle helpers (API.md §5.6–§5.12, §7.1, §11.6).

The reference below is independent of the package: E4M3 and E2M1 encoders enumerate every
representable value and pick the nearest one (ties to the even code), the FP32 steps of the §5.8
algorithm run in numpy float32, and the swizzle follows the "512-byte tile" description.
"""

import importlib
import os

import numpy as np
import pytest
import torch

from .helpers import msa

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]

nv = importlib.import_module(msa.__name__ + ".nvfp4")


def _api(name):
    return getattr(msa, name, None) or getattr(nv, name)


quantize = _api("quantize_bf16_to_nvfp4_128x4")
quantize_kv = _api("quantize_kv_bf16_to_nvfp4_128x4")
dequantize = _api("dequantize_nvfp4_128x4_to_bf16")
swizzle = _api("swizzle_nvfp4_scale_to_128x4")
gs_from_amax = _api("nvfp4_global_scale_from_amax")
native_dequant = _api("native_nvfp4_dequant_swizzled_to_bf16")
Nvfp4QuantizedTensor = _api("Nvfp4QuantizedTensor")

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)

# ------------------------------------------------------------------------------------------------
# independent reference
# ------------------------------------------------------------------------------------------------


def _e4m3_value(code):
    e, m = code >> 3, code & 7
    return m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)


E4M3_POS = np.array([_e4m3_value(c) for c in range(0x7F)], dtype=np.float64)  # codes 0..0x7E, ascending
E2M1_POS = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)


def _nearest_even(table, a):
    """Index of the nearest table entry to each a >= 0 (ties to the even index), saturating at the top."""
    a = np.asarray(a, dtype=np.float64)
    hi = np.clip(np.searchsorted(table, a, side="left"), 1, len(table) - 1)
    lo = hi - 1
    dlo = a - table[lo]
    dhi = table[hi] - a
    pick = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    pick = np.where(a >= table[-1], len(table) - 1, pick)
    pick = np.where(a <= 0, 0, pick)
    return pick.astype(np.int64)


def ref_e4m3(v):
    return _nearest_even(E4M3_POS, v)


def ref_e2m1(w):
    w = np.asarray(w, dtype=np.float32)
    mag = _nearest_even(E2M1_POS, np.abs(w).astype(np.float64))
    return mag | (np.signbit(w).astype(np.int64) << 3)


def ref_off(r, c, cols):
    """Swizzled offset from the tile description: 512-byte tiles of 128x4, row 32a+b', col c at 16b'+4a+c."""
    cp = -(-cols // 4) * 4
    tile = (r // 128) * (cp // 4) + c // 4
    rr = r % 128
    a, b = rr // 32, rr % 32
    return tile * 512 + 16 * b + 4 * a + c % 4


def ref_quantize(x: torch.Tensor):
    """§5.8 in numpy float32 plus the NaN policy (docs/API.md §12.3): NaN elements do not enter the amax, and a
    16-element block holding a NaN gets scale byte 0x7F (NaN) and all-zero codes.
    Returns (data uint8 [R, D/2], scale bytes [R', C'], global fp32, codes)."""
    xf = x.detach().to(torch.float32).cpu().reshape(-1, x.shape[-1]).numpy().astype(np.float32)
    R, D = xf.shape
    C = D // 16
    RP, CP = -(-R // 128) * 128, -(-C // 4) * 4
    nan_blk = np.isnan(xf.reshape(R, C, 16)).any(axis=2)
    xf_ok = np.where(np.isnan(xf), F32(0), xf)  # |x| >= 0, so a NaN replaced by 0 never raises the amax
    amax = F32(np.abs(xf_ok).max()) if xf.size else F32(0)
    xf = xf_ok
    with np.errstate(divide="ignore", over="ignore"):
        s_enc = F32(2688.0) / amax if amax != 0 else F32(np.inf)
    s_enc = min(s_enc, FLT_MAX)
    if amax == 0 or s_enc == 0:
        s_enc = F32(1.0)
    s_enc = F32(s_enc)
    blocks = xf.reshape(R, C, 16)
    a_b = np.abs(blocks).max(axis=2).astype(np.float32)
    sc = ref_e4m3(a_b * F32(s_enc * F32(1.0 / 6.0)))
    sf = E4M3_POS[sc].astype(np.float32)
    inv_s = F32(F32(1.0) / s_enc)
    prod = (sf * inv_s).astype(np.float32)
    with np.errstate(divide="ignore"):
        coef = np.minimum(F32(1.0) / prod, FLT_MAX).astype(np.float32)
    sc = np.where(nan_blk, 0x7F, sc)
    codes = ref_e2m1((blocks * coef[:, :, None]).astype(np.float32))
    codes = np.where(nan_blk[:, :, None], 0, codes).reshape(R, D)
    data = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    scale = np.zeros(RP * CP, dtype=np.uint8)
    for r in range(R):
        for c in range(C):
            scale[ref_off(r, c, C)] = sc[r, c]
    gs = F32(amax / F32(2688.0))
    return data, scale.reshape(RP, CP), gs, codes


def ref_dequant_f32(data_u8: np.ndarray, scale_flat: np.ndarray, g, R, C, include_g=True):
    """(LUT * E4M3) * g in float32 (then the caller rounds to bf16)."""
    d = data_u8.reshape(R, C * 8).astype(np.int64)
    codes = np.stack([d & 15, d >> 4], -1).reshape(R, C, 16)
    lut = np.concatenate([E2M1_POS, -E2M1_POS]).astype(np.float32)
    vals = lut[codes]
    sf = np.empty((R, C), dtype=np.float32)
    for r in range(R):
        for c in range(C):
            b = int(scale_flat[ref_off(r, c, C)])
            v = np.nan if (b & 0x7F) == 0x7F else _e4m3_value(b & 0x7F)
            sf[r, c] = -v if b & 0x80 else v
    out = (vals * sf[:, :, None]).astype(np.float32)
    if include_g:
        out = (out * F32(g)).astype(np.float32)
    return out.reshape(R, C * 16)


def _bf16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16).cpu()


def check_quant_exact(x: torch.Tensor):
    q = quantize(x)
    data, scale, gs, _ = ref_quantize(x)
    R = int(np.prod(x.shape[:-1]))
    C = x.shape[-1] // 16
    assert isinstance(q, Nvfp4QuantizedTensor)
    assert q.original_shape == tuple(x.shape)
    assert q.logical_scale_shape == (R, C)
    assert q.data.dtype == torch.uint8 and tuple(q.data.shape) == (*x.shape[:-1], x.shape[-1] // 2)
    assert q.scale_128x4.dtype == torch.uint8 and tuple(q.scale_128x4.shape) == scale.shape
    assert q.global_scale.dtype == torch.float32 and tuple(q.global_scale.shape) == (1,)
    got = q.data.cpu().reshape(R, -1).numpy()
    mism = got != data
    assert not mism.any(), f"{mism.sum()} data bytes differ (first at {np.argwhere(mism)[0]})"
    gsc = q.scale_128x4.cpu().numpy()
    assert np.array_equal(gsc, scale), f"{(gsc != scale).sum()} scale bytes differ"
    assert q.global_scale.cpu().numpy()[0].tobytes() == F32(gs).tobytes()
    return q


def check_bound(x: torch.Tensor, q):
    xh = dequantize(q).double().cpu().reshape(-1, x.shape[-1])
    xd = x.double().cpu().reshape(-1, x.shape[-1])
    g = float(q.global_scale[0])
    ab = xd.abs().reshape(xd.shape[0], -1, 16).amax(-1).repeat_interleave(16, dim=1)
    bound = 0.25 * ab + 6 * 2.0**-9 * g
    err = (xh - xd).abs()
    assert (err <= bound * (1 + 1e-6) + 1e-30).all(), f"max excess {(err - bound).max().item()}"


def _cpu_dtype(device):
    return torch.float16 if device.type == "cpu" else torch.bfloat16


def _mixed(shape, dtype, device):
    """randn with zeros, tiny and large magnitudes mixed in."""
    x = torch.randn(shape, dtype=torch.float32)
    flat = x.view(-1)
    n = flat.numel()
    idx = torch.randperm(n)
    flat[idx[: n // 10]] = 0.0
    flat[idx[n // 10: n // 5]] *= 1e-4
    flat[idx[n // 5: n // 5 + max(1, n // 50)]] *= 300.0
    flat[idx[n // 5 + max(1, n // 50): n // 4]] = -0.0
    return x.to(dtype).to(device)


# ------------------------------------------------------------------------------------------------
# quantise
# ------------------------------------------------------------------------------------------------


@pytest.mark.kernels_ci
@pytest.mark.parametrize("shape", [(1, 16), (7, 32), (5, 48), (33, 64), (2, 3, 128)])
def test_quantize_exact_random(device, shape):
    x = _mixed(shape, _cpu_dtype(device), device)
    q = check_quant_exact(x)
    check_bound(x, q)


@pytest.mark.parametrize("shape", [(2, 2, 128, 32), (3, 130, 16)])
def test_quantize_exact_paged_shapes(device, shape):
    x = _mixed(shape, _cpu_dtype(device), device)
    check_quant_exact(x)


def test_quantize_exact_element_ties(device):
    """amax = 2688 gives S_enc = 1, so x * coef lands exactly on E2M1 midpoints."""
    dt = _cpu_dtype(device)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 3.0, 4.0, 5.5, 0.1, 0.3, 6.0, 2.0])
    rows = [torch.cat([torch.tensor([2688.0]), torch.zeros(15)])]
    for s in (1.0, 2.0, 0.5, 0.25, 8.0):
        rows.append(ties * s)
        rows.append(-ties * s)
    x = torch.stack(rows).reshape(-1, 16).to(dt).to(device)
    check_quant_exact(x)
    check_quant_exact(torch.cat([x, x[:1]]).reshape(-1, 32))


def test_quantize_exact_scale_ties(device):
    """amax = 448 gives S_enc*(1/6) = 1 exactly, so block amaxes land on E4M3 midpoints (incl. subnormal)."""
    dt = _cpu_dtype(device)
    mids = [448.0, 1.0625, 1.1875, 1.3125, 2.125, 0.5 * 2.0**-9, 1.5 * 2.0**-9, 2.5 * 2.0**-9, 7.5 * 2.0**-9,
            15.5 * 2.0**-10, 2.0**-12, 3.0 * 2.0**-10, 240.0 + 8.0, 0.0, 17.0, 0.09375]
    rows = []
    for m in mids:
        row = torch.linspace(-1.0, 1.0, 16) * m
        row[3] = m
        rows.append(row)
    x = torch.stack(rows).reshape(-1, 64).to(dt).to(device)
    check_quant_exact(x)


def test_quantize_all_zero_and_tiny(device):
    dt = _cpu_dtype(device)
    z = torch.zeros(3, 32, dtype=dt, device=device)
    q = check_quant_exact(z)
    assert float(q.global_scale[0]) == 0.0
    assert int(q.data.sum()) == 0 and int(q.scale_128x4.sum()) == 0
    # negative zeros keep their sign: code 8
    nz = -torch.zeros(2, 16, dtype=dt, device=device)
    q = check_quant_exact(nz)
    assert (q.data.cpu() == 0x88).all()
    tiny = (torch.randn(4, 32) * 1e-6).to(dt).to(device)
    check_quant_exact(tiny)


def test_quantize_r1_and_odd_r(device):
    dt = _cpu_dtype(device)
    for shape in [(1, 128), (1, 1, 16), (13, 16), (129, 32)]:
        x = _mixed(shape, dt, device)
        check_quant_exact(x)


def test_quantize_empty(device):
    for shape in [(0, 32), (2, 0, 64)]:
        x = torch.zeros(shape, dtype=_cpu_dtype(device), device=device)
        q = quantize(x)
        assert tuple(q.data.shape) == (*shape[:-1], shape[-1] // 2)
        assert tuple(q.scale_128x4.shape) == (0, -(-(shape[-1] // 16) // 4) * 4)
        assert q.global_scale.tolist() == [0.0]
        assert q.logical_scale_shape == (0, shape[-1] // 16)


def test_quantize_non_contiguous(device):
    dt = _cpu_dtype(device)
    # NHD token-major cache viewed as paged HND (the important strided case)
    kc = _mixed((2 * 128, 2, 32), dt, device)
    hnd = kc.view(2, 128, 2, 32).permute(0, 2, 1, 3)
    assert not hnd.is_contiguous()
    q = check_quant_exact(hnd)
    q2 = quantize(hnd.contiguous())
    assert torch.equal(q.data, q2.data) and torch.equal(q.scale_128x4, q2.scale_128x4)
    # transposed leading dims and a strided last dim
    base = _mixed((6, 5, 64), dt, device)
    check_quant_exact(base.transpose(0, 1))
    check_quant_exact(base[:, :, ::2])
    # 5-D input with irreducible strides (falls back to an internal copy)
    five = _mixed((2, 3, 2, 2, 32), dt, device).permute(4, 3, 2, 1, 0).permute(4, 3, 2, 1, 0).transpose(1, 3)
    check_quant_exact(five)


def test_quantize_kv_independent(device):
    dt = _cpu_dtype(device)
    k = _mixed((4, 2, 32), dt, device)
    v = (_mixed((4, 2, 32), dt, device) * 10).to(dt)
    qk, qv = quantize_kv(k, v)
    for x, q in ((k, qk), (v, qv)):
        r = quantize(x)
        assert torch.equal(q.data, r.data) and torch.equal(q.scale_128x4, r.scale_128x4)
        assert torch.equal(q.global_scale, r.global_scale)
    assert float(qk.global_scale[0]) != float(qv.global_scale[0])


def test_quantize_errors(device, monkeypatch):
    with pytest.raises(TypeError):
        quantize(torch.randn(4, 32, device=device))
    with pytest.raises(ValueError):
        quantize(torch.randn(32, device=device).half())
    with pytest.raises(ValueError):
        quantize(torch.randn(4, 24, device=device).half())
    with pytest.raises(TypeError):
        quantize(torch.randint(0, 3, (4, 32), device=device))
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError):
            quantize(torch.randn(4, 32).half())


@pytest.mark.kernels_ci
def test_quantize_nan_blocks(device):
    """NaN policy: a NaN makes its 16-element block NaN after dequantisation (scale byte 0x7F, codes 0) and
    changes nothing else (the amax ignores it); it used to be encoded silently as 0."""
    dt = _cpu_dtype(device)
    x = _mixed((6, 64), dt, "cpu")
    x[0, 3] = float("nan")             # block (0, 0)
    x[2, 16:32] = float("nan")         # the whole block (2, 1)
    x[5, 63] = -float("nan")           # block (5, 3), negative NaN
    x[4, 40] = 1000.0                  # the amax sits in a finite block
    x = x.to(device)
    q = check_quant_exact(x)
    out = dequantize(q).float().cpu().reshape(6, 4, 16)
    nan_blk = torch.zeros(6, 4, dtype=torch.bool)
    nan_blk[0, 0] = nan_blk[2, 1] = nan_blk[5, 3] = True
    assert torch.isnan(out[nan_blk]).all() and not torch.isnan(out[~nan_blk]).any()
    assert float(q.global_scale[0]) == float(F32(1000.0) / F32(2688.0))
    # the other blocks are exactly those of the input with the NaN blocks zeroed
    z = x.clone()
    z.view(6, 4, 16)[nan_blk.to(device)] = 0
    qz = quantize(z)
    keep = ~nan_blk.view(6, 4, 1).expand(6, 4, 8).reshape(6, 32)
    assert torch.equal(q.data.cpu()[keep], qz.data.cpu()[keep])
    assert torch.equal(q.global_scale, qz.global_scale)
    # the native (Triton) dequantiser agrees: same NaN pattern, the other values bit for bit
    nat = native_dequant(q.data, q.scale_128x4, q.global_scale).cpu()
    ref = dequantize(q).cpu()
    assert torch.equal(torch.isnan(nat), torch.isnan(ref))
    assert torch.equal(_bf16_bits(nat)[~torch.isnan(ref)], _bf16_bits(ref)[~torch.isnan(ref)])


@pytest.mark.kernels_ci
def test_quantize_all_nan_and_kv_pair(device):
    dt = _cpu_dtype(device)
    x = torch.full((3, 32), float("nan"), dtype=dt, device=device)
    q = check_quant_exact(x)
    assert float(q.global_scale[0]) == 0.0 and int(q.data.sum()) == 0
    assert torch.isnan(dequantize(q).float()).all()
    k = _mixed((4, 2, 32), dt, device)
    v = _mixed((4, 2, 32), dt, device)
    k[1, 0, 5] = float("nan")
    qk, qv = quantize_kv(k, v)
    for t, qt in ((k, qk), (v, qv)):
        r = check_quant_exact(t)
        assert torch.equal(qt.data, r.data) and torch.equal(qt.scale_128x4, r.scale_128x4)
    assert torch.isnan(dequantize(qk).float()[1, 0, :16]).all()
    assert not torch.isnan(dequantize(qv).float()).any()


def test_quantize_opcheck(device):
    x = _mixed((5, 32), _cpu_dtype(device), device)
    torch.library.opcheck(nv._nvfp4_quantize_op, (x,))
    q = quantize(x)
    torch.library.opcheck(nv._nvfp4_dequant_op, (q.data, q.scale_128x4, q.global_scale, 1.0))
    torch.library.opcheck(nv._nvfp4_dequant_op, (q.data, q.scale_128x4, None, 0.5))


def test_compile_fullgraph(device):
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    x = _mixed((6, 32), _cpu_dtype(device), device)

    def f(x):
        q = quantize(x)
        return q.data, q.scale_128x4, q.global_scale, native_dequant(q.data, q.scale_128x4, q.global_scale)

    cf = torch.compile(f, fullgraph=True, backend=backend)
    got = cf(x)
    want = f(x)
    for a, b in zip(got, want):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bfloat16 else a,
                           b.view(torch.uint8) if b.dtype == torch.bfloat16 else b)


# ------------------------------------------------------------------------------------------------
# swizzle, global scale, dequantise
# ------------------------------------------------------------------------------------------------


@pytest.mark.kernels_ci
@pytest.mark.parametrize("rows,cols", [(1, 1), (5, 3), (128, 8), (130, 8), (300, 6), (0, 4)])
def test_swizzle_offsets(rows, cols):
    src = torch.arange(1, (rows + 3) * (cols + 2) + 1, dtype=torch.int32).view(rows + 3, cols + 2)
    out = swizzle(src, rows=rows, cols=cols)
    RP, CP = -(-rows // 128) * 128, -(-cols // 4) * 4
    assert out.dtype == torch.int32 and tuple(out.shape) == (RP, CP) and out.is_contiguous()
    want = np.zeros(RP * CP, dtype=np.int32)
    for r in range(rows):
        for c in range(cols):
            want[ref_off(r, c, cols)] = int(src[r, c])
    assert np.array_equal(out.reshape(-1).numpy(), want)  # includes padding == 0


def test_swizzle_dtypes_and_errors():
    s = torch.randint(0, 127, (7, 5), dtype=torch.uint8)
    o8 = swizzle(s, rows=7, cols=5)
    of = swizzle(s.view(torch.float8_e4m3fn), rows=7, cols=5)
    assert of.dtype == torch.float8_e4m3fn and torch.equal(of.view(torch.uint8), o8)
    o32 = swizzle(s.float(), rows=7, cols=5)
    assert o32.dtype == torch.float32 and torch.equal(o32.to(torch.uint8), o8)
    with pytest.raises(ValueError):
        swizzle(s.view(-1), rows=7, cols=5)
    with pytest.raises(ValueError):
        swizzle(s, rows=8, cols=5)
    with pytest.raises(ValueError):
        swizzle(s, rows=7, cols=6)


def test_global_scale_from_amax():
    a = torch.tensor([2688.0, 0.0, 1.0, 5376.0])
    g = gs_from_amax(a)
    assert g.dtype == torch.float32 and g.tolist()[:2] == [1.0, 0.0] and g[3] == 2.0
    assert g[2].item() == float(F32(1.0) / F32(2688.0))
    assert gs_from_amax(torch.tensor([2688.0], dtype=torch.bfloat16)).tolist() == [1.0]


def _random_q(lead, D, *, nan=False, device="cpu"):
    R = int(np.prod(lead))
    C = D // 16
    data = torch.randint(0, 256, (*lead, D // 2), dtype=torch.uint8)
    lo = 0x00
    scale = torch.randint(lo, 0x7F, (-(-R // 128) * 128, -(-C // 4) * 4), dtype=torch.uint8)
    if nan:
        scale.view(-1)[:: 7] = 0x7F
    g = torch.tensor([float(np.random.default_rng(int(torch.randint(0, 1000, ()))).uniform(0.01, 3.0))],
                     dtype=torch.float32)
    return Nvfp4QuantizedTensor(data.to(device), scale.to(device), g.to(device), (R, C), (*lead, D))


@pytest.mark.kernels_ci
@pytest.mark.parametrize("include_g", [True, False])
def test_dequantize_exact(include_g):
    q = _random_q((3, 70), 48, nan=True)
    out = dequantize(q, include_global_scale=include_g)
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (3, 70, 48)
    R, C = q.logical_scale_shape
    ref = ref_dequant_f32(q.data.numpy(), q.scale_128x4.reshape(-1).numpy(), q.global_scale.numpy()[0], R, C,
                          include_g)
    ref_bf = torch.from_numpy(ref).to(torch.bfloat16).reshape(out.shape)
    nan = torch.isnan(ref_bf)
    assert nan.any() and torch.equal(torch.isnan(out), nan)
    assert torch.equal(_bf16_bits(out)[~nan], _bf16_bits(ref_bf)[~nan])


def test_dequantize_input_handling_and_errors():
    q = _random_q((4, 3), 32)
    base = dequantize(q)
    q_i8 = Nvfp4QuantizedTensor(q.data.view(torch.int8), q.scale_128x4, q.global_scale, q.logical_scale_shape,
                                q.original_shape)
    assert torch.equal(_bf16_bits(dequantize(q_i8)), _bf16_bits(base))
    bigger = torch.zeros(256, 8, dtype=torch.uint8)
    bigger.view(-1)[: q.scale_128x4.numel()] = q.scale_128x4.reshape(-1)
    q_big = Nvfp4QuantizedTensor(q.data, bigger.view(-1)[: 128 * 4 + 5].clone(), q.global_scale,
                                 q.logical_scale_shape, q.original_shape)
    assert torch.equal(_bf16_bits(dequantize(q_big)), _bf16_bits(base))
    bad = [
        Nvfp4QuantizedTensor(q.data[..., :8], q.scale_128x4, q.global_scale, q.logical_scale_shape, q.original_shape),
        Nvfp4QuantizedTensor(q.data, q.scale_128x4, q.global_scale, (12, 1), q.original_shape),
        Nvfp4QuantizedTensor(q.data, q.scale_128x4[:100], q.global_scale, q.logical_scale_shape, q.original_shape),
    ]
    for b in bad:
        with pytest.raises(ValueError):
            dequantize(b)


@pytest.mark.kernels_ci
def test_dequantize_argument_types_and_values():
    """Argument errors are TypeError (type / dtype) or ValueError (shape / size) naming the argument, never a
    bare IndexError / AttributeError."""
    import dataclasses

    q = _random_q((4, 3), 32)
    for bad in (q.data, None, (1, 2), {"data": q.data}):
        with pytest.raises(TypeError, match="qx must be an Nvfp4QuantizedTensor"):
            dequantize(bad)
    cases = [
        (dict(global_scale=torch.empty(0)), ValueError, "global_scale"),
        (dict(global_scale=torch.ones(2)), ValueError, "global_scale"),
        (dict(global_scale=torch.ones(1, dtype=torch.float64)), TypeError, "global_scale"),
        (dict(global_scale=torch.ones(1, dtype=torch.int32)), TypeError, "global_scale"),
        (dict(global_scale=1.0), TypeError, "global_scale"),
        (dict(global_scale=None), TypeError, "global_scale"),
        (dict(data=None), TypeError, "qx.data"),
        (dict(data=q.data.float()), TypeError, "qx.data"),
        (dict(data=torch.tensor(3, dtype=torch.uint8)), ValueError, "qx.data"),
        (dict(scale_128x4=[0] * 512), TypeError, "qx.scale_128x4"),
        (dict(scale_128x4=q.scale_128x4.to(torch.int32)), TypeError, "qx.scale_128x4"),
        (dict(original_shape=None), TypeError, "qx.original_shape"),
        (dict(original_shape=(4, 3, 32.0)), TypeError, "qx.original_shape"),
        (dict(original_shape=()), ValueError, "qx.original_shape"),
        (dict(logical_scale_shape=(12,)), ValueError, "qx.logical_scale_shape"),
        (dict(logical_scale_shape=(12, "2")), TypeError, "qx.logical_scale_shape"),
        (dict(logical_scale_shape=(-12, 2)), ValueError, "qx.logical_scale_shape"),
    ]
    for change, exc, name in cases:
        with pytest.raises(exc, match=name.replace(".", r"\.")):
            dequantize(dataclasses.replace(q, **change))
    # global_scale is validated even when it is not applied
    with pytest.raises(ValueError, match="global_scale"):
        dequantize(dataclasses.replace(q, global_scale=torch.empty(0)), include_global_scale=False)
    # a non-finite global scale is a value, not an error: it propagates (docs/API.md §12.4)
    out = dequantize(dataclasses.replace(q, global_scale=torch.tensor([float("inf")]))).float()
    base = dequantize(q, include_global_scale=False).float()
    assert torch.isinf(out[base != 0]).all() and torch.isnan(out[base == 0]).all()  # x * inf, 0 * inf
    assert torch.isnan(dequantize(dataclasses.replace(q, global_scale=torch.tensor([float("nan")]))).float()).all()
    # numpy / torch integer shapes are fine
    assert torch.equal(_bf16_bits(dequantize(dataclasses.replace(q, original_shape=torch.Size((4, 3, 32))))),
                       _bf16_bits(dequantize(q)))


def test_other_nvfp4_helpers_argument_errors(device):
    s = torch.zeros(8, 4, dtype=torch.uint8)
    for rows, exc in ((None, TypeError), (1.5, TypeError), (True, TypeError), ("3", TypeError), (-1, ValueError)):
        with pytest.raises(exc, match="rows"):
            swizzle(s, rows=rows, cols=2)
    assert swizzle(s, rows=np.int64(3), cols=np.int32(2)).shape == (128, 4)
    with pytest.raises(TypeError, match="scale"):
        swizzle(s.numpy(), rows=1, cols=1)
    with pytest.raises(TypeError, match="amax"):
        gs_from_amax(2688.0)
    with pytest.raises(TypeError, match="amax"):
        gs_from_amax(torch.ones(1, dtype=torch.complex64))
    p = torch.zeros(4, 16, dtype=torch.uint8, device=device)
    sc = torch.zeros(128, 4, dtype=torch.uint8, device=device)
    with pytest.raises(TypeError, match="global_scale"):
        native_dequant(p, sc, None)
    with pytest.raises(ValueError, match="global_scale"):
        native_dequant(p, sc, torch.empty(0, device=device))
    with pytest.raises(TypeError, match="packed"):
        native_dequant(p.float(), sc, 1.0)
    with pytest.raises(TypeError, match="x"):
        quantize(p.numpy() if device.type == "cpu" else None)


def test_native_dequant_bit_identical(device):
    q = _random_q((2, 3, 40), 64, nan=True)
    ref = dequantize(q)
    got = native_dequant(q.data.to(device), q.scale_128x4.to(device), q.global_scale.to(device))
    assert got.dtype == torch.bfloat16 and tuple(got.shape) == (2, 3, 40, 64)
    got = got.cpu()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(_bf16_bits(got)[~nan], _bf16_bits(ref)[~nan])
    # python float global scale
    g = float(q.global_scale[0])
    got_f = native_dequant(q.data.to(device), q.scale_128x4.to(device), g).cpu()
    assert torch.equal(_bf16_bits(got_f)[~nan], _bf16_bits(ref)[~nan])
    # strided packed input (HND view of an NHD cache)
    nhd = torch.randint(0, 256, (2 * 128, 2, 16), dtype=torch.uint8)
    hnd = nhd.view(2, 128, 2, 16).permute(0, 2, 1, 3)
    sc = torch.randint(0, 0x7F, (512, 4), dtype=torch.uint8)
    gs = torch.tensor([0.37])
    qs = Nvfp4QuantizedTensor(hnd.contiguous(), sc, gs, (512, 2), (2, 2, 128, 32))
    got_s = native_dequant(hnd.to(device), sc.to(device), gs.to(device)).cpu()
    assert torch.equal(_bf16_bits(got_s), _bf16_bits(dequantize(qs)))


def test_native_dequant_errors(device):
    p = torch.zeros(4, 16, dtype=torch.uint8, device=device)
    s = torch.zeros(128, 4, dtype=torch.uint8, device=device)
    g = torch.ones(1, device=device)
    with pytest.raises(TypeError):
        native_dequant(p.view(torch.int8), s, g)
    with pytest.raises(TypeError):
        native_dequant(p, s.float(), g)
    with pytest.raises(ValueError):
        native_dequant(p.view(-1), s, g)
    with pytest.raises(ValueError):
        native_dequant(p[:, :12], s, g)
    with pytest.raises(ValueError):
        native_dequant(p, s[:100], g)
    e = native_dequant(p[:0], s, g)
    assert tuple(e.shape) == (0, 32)


def test_round_trip(device):
    dt = _cpu_dtype(device)
    x = (torch.randn(3, 2, 64) * 3).to(dt).to(device)
    q = quantize(x)
    check_bound(x, q)
    xh = dequantize(q)
    q2 = quantize(xh.to(dt))
    # re-quantising dequantised data reproduces it (values are representable by construction)
    assert torch.equal(_bf16_bits(dequantize(q2)), _bf16_bits(xh)) or dt == torch.float16
    assert torch.equal(_bf16_bits(native_dequant(q.data, q.scale_128x4, q.global_scale)), _bf16_bits(xh))


# ------------------------------------------------------------------------------------------------
# GPU-only: bf16, large shapes, graphs, Transformer Engine cross-check
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_bf16_exact_large(cuda_device):
    x = _mixed((3, 4, 128, 128), torch.bfloat16, cuda_device)
    q = check_quant_exact(x)
    check_bound(x, q)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2)
    xt = torch.stack([torch.cat([torch.tensor([2688.0]), torch.zeros(15)]), ties, -ties, 2 * ties]).to(torch.bfloat16)
    check_quant_exact(xt.cuda())
    kc = _mixed((4 * 128, 4, 128), torch.bfloat16, cuda_device)
    check_quant_exact(kc.view(4, 128, 4, 128).permute(0, 2, 1, 3))


@pytest.mark.gpu
def test_gpu_native_dequant_large(cuda_device):
    x = torch.randn(64, 4, 128, 128, device=cuda_device, dtype=torch.bfloat16)
    q = quantize(x)
    a = dequantize(q)
    b = native_dequant(q.data, q.scale_128x4, q.global_scale)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    check_bound(x[:2], quantize(x[:2]))


@pytest.mark.gpu
def test_gpu_cuda_graph(cuda_device):
    x = torch.randn(8, 4, 128, 128, device=cuda_device, dtype=torch.bfloat16)
    quantize(x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q = quantize(x)
        d = native_dequant(q.data, q.scale_128x4, q.global_scale)
    x.copy_(torch.randn_like(x) * 7)
    g.replay()
    torch.cuda.synchronize()
    r = quantize(x)
    assert torch.equal(q.data, r.data) and torch.equal(q.scale_128x4, r.scale_128x4)
    assert torch.equal(q.global_scale, r.global_scale)
    assert torch.equal(d.view(torch.int16), dequantize(r).view(torch.int16))


@pytest.mark.gpu
def test_gpu_transformer_engine_crosscheck(cuda_device):
    """When TE is installed: TE's NVFP4 output satisfies the bound; report byte mismatch vs ours."""
    te = pytest.importorskip("transformer_engine.pytorch")
    try:
        from transformer_engine.pytorch.tensor.nvfp4_tensor import NVFP4Quantizer
    except Exception as e:  # pragma: no cover - depends on the TE version
        pytest.skip(f"TE without NVFP4Quantizer: {e}")
    x = torch.randn(1024, 128, device=cuda_device, dtype=torch.bfloat16)
    try:
        tq = NVFP4Quantizer(rowwise=True, columnwise=False)(x)
    except Exception as e:  # pragma: no cover
        pytest.skip(f"TE NVFP4 quantiser unusable here: {e}")
    R, C = 1024, 8
    te_data = tq._rowwise_data.view(torch.uint8).reshape(R, 64)
    te_scale = swizzle(tq._rowwise_scale_inv.view(torch.uint8)[:R, :C], rows=R, cols=C)
    te_g = gs_from_amax(tq._amax_rowwise.reshape(-1)[:1])
    te_q = Nvfp4QuantizedTensor(te_data, te_scale, te_g, (R, C), (R, 128))
    check_bound(x, te_q)
    ours = quantize(x)
    mism = (ours.data != te_data).float().mean().item()
    smism = (ours.scale_128x4 != te_scale).float().mean().item()
    print(f"TE {getattr(te, '__version__', '?')}: data byte mismatch {mism:.4%}, scale byte mismatch {smism:.4%}")


@pytest.mark.gpu
def test_gpu_quantize_nan_blocks(cuda_device):
    """The NaN policy on the GPU (hardware E4M3 conversion path), bf16, large and strided."""
    x = _mixed((2, 4, 128, 128), torch.bfloat16, cuda_device)
    x.view(-1)[torch.randperm(x.numel(), device=cuda_device)[:300]] = float("nan")
    q = check_quant_exact(x)
    nan_blk = torch.isnan(x.float()).view(-1, 8, 16).any(-1)
    out = dequantize(q).float().view(-1, 8, 16)
    assert torch.isnan(out[nan_blk]).all() and not torch.isnan(out[~nan_blk]).any()
    check_quant_exact(x.permute(0, 2, 1, 3))
    qk, qv = quantize_kv(x, x.flip(0))
    assert torch.equal(qk.scale_128x4, q.scale_128x4) and torch.equal(qk.data, q.data)
