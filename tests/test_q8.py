"""INT8 format and kernels: layout, quantization error bound, GGUF Q8_0 bit-exact import, Numba == NumPy reference.

Tolerances, as in test_q4.py. The Numba kernel and the NumPy reference do the same exact integer dot products
(the kernel's +128 code offset is taken back off in int32) and differ only in the order of fp32 operations, so they
agree to 1e-5 of mag = |x| @ |dequant(W)|.T (K <= 192 here). Against the exact x @ dequant(W).T the kernel also
carries the int8 activation rounding, bounded per output by sum over blocks b of d_b / 2 * sum_{k in b} |w_k|.
"""

import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinyhun.errors import TinyhunError
from tinyhun.kernels import cpu_simd, q4, q4_cpu, q8, q8_cpu

from test_q4 import check_dot_code_paths, check_rows_alone, check_safetensors_roundtrip, weights

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _weights(rng, n, k):
    return weights(rng, n, k, const=-0.37)   # a negative constant block: its max |w| is -min


def _terms(x, q):
    """mag and the activation-rounding bound (module docstring), both [T, N]."""
    wq = np.abs(q8.dequantize_q8(q).astype(np.float64))
    d = np.repeat(np.abs(x).reshape(len(x), -1, 32).max(-1) / 127.0, 32, axis=1)
    return np.abs(x.astype(np.float64)) @ wq.T, (d / 2) @ wq.T


def _check_kernel(x, q, buf=None):
    t = len(x)
    ref = q8.matmul_q8(np.empty((t, q.n), np.float32), x, q)
    out = np.full((t, q.n), np.nan, np.float32)
    q8_cpu.matmul_q8(out, x, q, buf)
    mag, act_err = _terms(x, q)
    assert np.all(np.abs(out - ref) <= 1e-5 * mag + 1e-30)
    exact = x.astype(np.float64) @ q8.dequantize_q8(q).astype(np.float64).T
    assert np.all(np.abs(out - exact) <= act_err + 1e-5 * mag + 1e-30)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), blocks=st.integers(1, 6), t=st.sampled_from([1, 1, 2, 5]),
       seed=st.integers(0, 2**32 - 1))
def test_kernel_matches_reference(n, blocks, t, seed):
    rng = np.random.default_rng(seed)
    k = blocks * 32
    q = q8.quantize_q8(_weights(rng, n, k))
    x = rng.standard_normal((t, k)).astype(np.float32) * np.float32(rng.uniform(0.01, 100))
    x[0, :32] = 0                                                                   # an all-zero int8 block
    _check_kernel(x, q)


def test_gemm_passes_and_reused_buffer():
    rng = np.random.default_rng(1)
    q = q8.quantize_q8(_weights(rng, 41, 96))
    buf = q4.Q8Acts.empty(q8_cpu.GEMM_TOKENS + 8, 128)
    for t in (1, 3, q8_cpu.GEMM_TOKENS + 3):                       # the last takes two passes over the weight
        _check_kernel(rng.standard_normal((t, 96)).astype(np.float32), q, buf)


@pytest.mark.parametrize("n, k", [(37, 96), (16, 32), (1, 160), (49, 64)])
def test_few_tokens_equal_rows_alone(n, k):
    rng = np.random.default_rng(n + k)
    q = q8.quantize_q8(_weights(rng, n, k))
    x = rng.standard_normal((q4_cpu.FEW_T + 1, k)).astype(np.float32)
    x[1, :32] = 0                                                                   # an all-zero int8 block
    check_rows_alone(q8_cpu.matmul_q8, x, q)
    for t in range(1, len(x) + 1):                                 # and each T against the reference
        _check_kernel(x[:t], q)


def test_extreme_codes():
    """Codes -128 and 127 against int8 activations of +-127: the u8 offset trick must stay exact there."""
    n, k = 19, 64
    codes = np.where(np.random.default_rng(7).random((n, k)) < 0.5, -128, 127).astype(np.int8)
    q = q8._pack(codes, np.full((n, k // 32), 0.5, np.float16))
    x = np.where(np.random.default_rng(8).random((2, k)) < 0.5, -127.0, 127.0).astype(np.float32)  # d = 1 exactly
    for t in (1, 2):
        out = q8_cpu.matmul_q8(np.empty((t, n), np.float32), x[:t], q)
        np.testing.assert_array_equal(out, x[:t] @ (codes.astype(np.float32) * 0.5).T)   # all exact in fp32


def test_layout_matches_docstring():
    n, k = 20, 64
    codes = np.random.default_rng(2).integers(-128, 128, (n, k), dtype=np.int8)
    scales = np.random.default_rng(2).uniform(0.1, 1, (n, 2)).astype(np.float16)
    q = q8._pack(codes, scales)
    assert q.packed.shape == (2, 16, 64) and q.scales.shape == (2, 2, 16)
    for t, c, r, j in np.ndindex(2, 16, 16, 4):
        row = 16 * t + r
        assert q.packed[t, c, 4 * r + j] == (codes[row, 4 * c + j] if row < n else 0)
    for t, b, r in np.ndindex(2, 2, 16):
        row = 16 * t + r
        assert q.scales[t, b, r] == (scales[row, b] if row < n else 0)
    unpacked = q8.unpack_q8(q)
    np.testing.assert_array_equal(unpacked[0], codes)
    np.testing.assert_array_equal(unpacked[1], scales)


def test_dequantize_rows_matches_full_dequantization():
    q = q8.quantize_q8(_weights(np.random.default_rng(6), 37, 128))
    ids = np.array([[36, 0], [17, 17]])
    np.testing.assert_array_equal(q8.dequantize_rows(q, ids), q8.dequantize_q8(q)[ids.reshape(-1)])
    assert q8.dequantize_rows(q, []).shape == (0, 128)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), blocks=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_roundtrip_error_within_half_scale(n, blocks, seed):
    rng = np.random.default_rng(seed)
    w = _weights(rng, n, blocks * 32)
    q = q8.quantize_q8(w)
    codes, s = q8.unpack_q8(q)
    assert codes.min() >= -127 and codes.max() <= 127
    half = np.repeat(s.astype(np.float32), 32, axis=1) / 2
    err = np.abs(q8.dequantize_q8(q) - w)
    assert np.all(err <= half * (1 + 1e-6) + 1e-6 * np.abs(w) + 1e-38)
    assert np.all(err[0] == 0)                                      # zero rows stay exactly zero


def test_gguf_import_is_bit_exact():
    rng = np.random.default_rng(3)
    n, k = 37, 96
    quantized = gguf.quants.quantize(_weights(rng, n, k), Q8_0)
    # arbitrary blocks too: random codes (-128 included) and random finite fp16 d, including negative d
    rand = rng.integers(0, 256, (n * k // 32, 34), dtype=np.uint8)
    rand[:, :2] = rng.uniform(-3, 3, (n * k // 32, 1)).astype(np.float16).view(np.uint8)
    for raw in (quantized, rand.reshape(n, -1)):
        q = q8.from_gguf_q8_0(raw, n, k)
        want = gguf.quants.dequantize(raw, Q8_0).reshape(n, k)
        np.testing.assert_array_equal(q8.dequantize_q8(q).view(np.uint32), want.view(np.uint32))
        rows = q8.dequantize_rows(q, [n - 1, 3])
        np.testing.assert_array_equal(rows.view(np.uint32), want[[n - 1, 3]].view(np.uint32))
        for t in (1, 2):
            _check_kernel(rng.standard_normal((t, k)).astype(np.float32), q)


def test_safetensors_roundtrip_and_bad_metadata(tmp_path):
    q = q8.quantize_q8(_weights(np.random.default_rng(4), 18, 64))
    arrays, meta = check_safetensors_roundtrip(tmp_path, q, q8.Q8Weight, q8.dequantize_q8)
    assert set(arrays) == {"q8weight", "q8scales"}
    assert meta == {"format": "q8_tiled16", "version": 1, "n": 18, "k": 64}
    assert q.nbytes == 2 * 16 * 64 + 2 * 2 * 16 * 2
    with pytest.raises(TinyhunError, match="format"):
        q8.Q8Weight.from_arrays(arrays, {**meta, "format": "q4_tiled16"})
    with pytest.raises(TinyhunError, match="integer n"):
        q8.Q8Weight.from_arrays(arrays, {**meta, "n": "18"})
    with pytest.raises(TinyhunError, match="q8scales"):
        q8.Q8Weight.from_arrays({"q8weight": arrays["q8weight"]}, meta)
    with pytest.raises(TinyhunError, match="q8scales"):
        q8.Q8Weight.from_arrays({**arrays, "q8scales": arrays["q8scales"][:1]}, meta)
    with pytest.raises(TinyhunError, match="q8weight"):
        q8.Q8Weight.from_arrays({**arrays, "q8weight": arrays["q8weight"].view(np.uint8)}, meta)
    with pytest.raises(TinyhunError, match="q8weight"):
        q8.Q8Weight.from_arrays(arrays, {**meta, "n": 40})


def test_bad_input_raises():
    w = np.zeros((4, 96), np.float32)
    with pytest.raises(TinyhunError, match="multiple"):
        q8.quantize_q8(w[:, :48])
    with pytest.raises(TinyhunError, match="2-D float"):
        q8.quantize_q8(w[0])
    with pytest.raises(TinyhunError, match="inf or nan"):
        q8.quantize_q8(np.full((2, 32), np.nan, np.float32))
    with pytest.raises(TinyhunError, match="fp16"):
        q8.quantize_q8(np.full((2, 32), 1e9, np.float32))
    with pytest.raises(TinyhunError, match="Q8_0"):
        q8.from_gguf_q8_0(np.zeros(33, np.uint8), 1, 32)
    q = q8.quantize_q8(w)
    with pytest.raises(TinyhunError, match="row ids"):
        q8.dequantize_rows(q, [4])
    with pytest.raises(TinyhunError, match="row ids"):
        q8.dequantize_rows(q, [-1])
    for mod in (q8, q8_cpu):
        with pytest.raises(TinyhunError, match="shapes"):
            mod.matmul_q8(np.empty((1, 4), np.float32), np.zeros((1, 64), np.float32), q)
        with pytest.raises(TinyhunError, match="float32"):
            mod.matmul_q8(np.empty((1, 4), np.float32), np.zeros((1, 96), np.float64), q)
        with pytest.raises(TinyhunError, match="Q8Weight"):
            mod.matmul_q8(np.empty((1, 4), np.float32), np.zeros((1, 96), np.float32), q4.quantize_q4(w))


@pytest.mark.parametrize("vnni", [False, True])
def test_integer_dot_both_code_paths(vnni, monkeypatch):
    """VPDPBUSD and its portable fallback give the same exact signed block dot product over the +128 codes."""
    def block(packed, xq, out):
        v = cpu_simd._splat_i(-128 * np.int32(xq.astype(np.int32).sum()))
        for c in range(8):
            v = cpu_simd._dot(v, q8_cpu._load_codes(packed, 64 * c), xq, 4 * c)
        cpu_simd._store_f(out, 0, cpu_simd._fma(cpu_simd._splat_f(0.0), v, cpu_simd._splat_f(1.0)))

    rng = np.random.default_rng(5)
    codes = rng.integers(-128, 128, (16, 32), dtype=np.int8)
    codes[0] = -128
    xq = rng.integers(-127, 128, 32, dtype=np.int8)
    packed = q8._pack(codes, np.ones((16, 1), np.float16)).packed
    check_dot_code_paths(vnni, monkeypatch, block, packed, xq, codes.astype(np.int32) @ xq.astype(np.int32))
