"""INT4 format and kernels: layout, quantization error bound, GGUF bit-exact import, Numba kernel == NumPy reference.

Tolerances. The Numba kernel and the NumPy reference do the same integer dot products and differ only in the order
of fp32 operations, so they must agree to 1e-5 of mag = sum_k |x_k| * (|q_k * scale| + (8 |scale| or |min|)), a bound
on the sum of the magnitudes of every term (K <= 512 here: ~16 fp32 accumulations of ~6e-8 each). Against the
exact x @ dequant(W).T the kernel may also carry the int8 activation rounding, bounded per output by
sum over blocks b of d_b / 2 * sum_{k in b} |w'_k| (w' = (q - 8) * scale sym, q * scale asym).
"""
import json

import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from numba import njit
from safetensors import safe_open
from safetensors.numpy import save_file

from tinyhun.errors import TinyhunError
from tinyhun.kernels import cpu_simd, q4, q4_cpu

GROUPS = st.sampled_from(q4.GROUPS)


def weights(rng, n, k, const=0.37):
    """Rows of very different magnitudes, a zero row and a constant group of `const`: the quantizers' edge cases
    (also used by test_q8.py)."""
    w = rng.standard_normal((n, k)).astype(np.float32) * np.exp(rng.uniform(-6, 2, (n, 1))).astype(np.float32)
    w[0] = 0
    if n > 1:
        w[1, :32] = const
    return w


def check_safetensors_roundtrip(tmp_path, q, cls, dequantize):
    """q survives safetensors (arrays + JSON metadata) bit for bit and a wrong version is refused; returns
    (arrays, metadata) for format-specific checks. Also used by test_q8.py."""
    arrays, meta = q.to_arrays(), q.metadata()
    path = str(tmp_path / "w.safetensors")
    save_file({f"lm_head.{key}": a for key, a in arrays.items()}, path, metadata={"lm_head": json.dumps(meta)})
    with safe_open(path, "numpy") as f:
        stored = {key: f.get_tensor(f"lm_head.{key}") for key in arrays}
        back = cls.from_arrays(stored, json.loads(f.metadata()["lm_head"]))
    np.testing.assert_array_equal(dequantize(back), dequantize(q))
    with pytest.raises(TinyhunError, match="version"):
        cls.from_arrays(arrays, {**meta, "version": 99})
    return arrays, meta


def check_dot_code_paths(vnni, monkeypatch, kernel, packed, xq, want):
    """kernel(packed, xq, out float32[16]) compiled afresh with VNNI on or off must write exactly `want`, and use
    VPDPBUSD only when on. Also used by test_q8.py."""
    if vnni and not cpu_simd.VNNI:
        pytest.skip("host has no AVX-512 VNNI")
    monkeypatch.setattr(cpu_simd, "VNNI", vnni)   # read when the intrinsic is lowered, i.e. by a fresh compile
    block = njit(kernel)
    out = np.empty(16, np.float32)
    block(packed, xq, out)
    np.testing.assert_array_equal(out, want)
    assert ("vpdpbusd" in block.inspect_asm(block.signatures[0])) == vnni


def _terms(x, q):
    """mag and the activation-rounding bound (module docstring), both [T, N]."""
    codes, s, m = q4.unpack_q4(q)
    s = np.repeat(s.astype(np.float64), q.group, axis=1)
    wq = np.abs(q4.dequantize_q4(q).astype(np.float64))                            # |w|
    extra = 8 * np.abs(s) if q.sym else np.abs(np.repeat(m.astype(np.float64), q.group, axis=1))
    ax = np.abs(x.astype(np.float64))
    d = np.repeat(np.abs(x).reshape(len(x), -1, 32).max(-1) / 127.0, 32, axis=1)
    return ax @ (np.abs(codes * s) + extra).T, (d / 2) @ wq.T


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), groups=st.integers(1, 4), group=GROUPS, sym=st.booleans(),
       t=st.sampled_from([1, 1, 2, 5]), seed=st.integers(0, 2**32 - 1))
def test_kernel_matches_reference(n, groups, group, sym, t, seed):
    rng = np.random.default_rng(seed)
    k = groups * group
    q = q4.quantize_q4(weights(rng, n, k), group, sym)
    x = rng.standard_normal((t, k)).astype(np.float32) * np.float32(rng.uniform(0.01, 100))
    x[0, :32] = 0                                                                   # an all-zero int8 block
    ref = q4.matmul_q4(np.empty((t, n), np.float32), x, q)
    out = np.full((t, n), np.nan, np.float32)
    q4_cpu.matmul_q4(out, x, q)
    mag, act_err = _terms(x, q)
    assert np.all(np.abs(out - ref) <= 1e-5 * mag + 1e-30)
    exact = x.astype(np.float64) @ q4.dequantize_q4(q).astype(np.float64).T
    assert np.all(np.abs(out - exact) <= act_err + 1e-5 * mag + 1e-30)


def test_reused_buffer_and_activation_rounding():
    rng = np.random.default_rng(1)
    q = q4.quantize_q4(weights(rng, 40, 128), 64, False)
    buf = q4.Q8Acts.empty(q4_cpu.GEMM_TOKENS + 8, 256)
    for t in (1, 3, q4_cpu.GEMM_TOKENS + 3):                       # the last takes two passes over the weight
        x = rng.standard_normal((t, 128)).astype(np.float32)
        want = q4.matmul_q4(np.empty((t, 40), np.float32), x, q)
        got = q4_cpu.matmul_q4(np.empty((t, 40), np.float32), x, q, buf)
        assert np.all(np.abs(got - want) <= 1e-5 * _terms(x, q)[0])
        acts = q4_cpu.quantize_acts(x)
        ref_acts = q4.quantize_acts(x)
        for a, b in zip(acts[:3], ref_acts[:3]):                   # q, d, qsum bit-identical to the reference
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(acts.xsum, ref_acts.xsum, rtol=2e-7, atol=0)   # d * qsum: 1 ulp


def check_rows_alone(matmul, x, q):
    """Every T (the few-token kernel for 2..FEW_T, groups of 4 with a partial last one, then the GEMM) gives each
    row exactly what the GEMV gives it alone: a batched decode stream equals its own single stream bit for bit.
    Also used by test_q8.py."""
    alone = np.concatenate([matmul(np.empty((1, q.n), np.float32), x[t:t + 1], q) for t in range(len(x))])
    for t in range(2, len(x) + 1):
        np.testing.assert_array_equal(matmul(np.full((t, q.n), np.nan, np.float32), x[:t], q), alone[:t])


@pytest.mark.parametrize("n, k, sym", [(37, 96, False), (16, 32, True), (1, 160, False), (33, 192, True)])
def test_few_tokens_equal_rows_alone(n, k, sym):
    rng = np.random.default_rng(n + k)
    q = q4.quantize_q4(weights(rng, n, k), 32, sym)
    x = rng.standard_normal((q4_cpu.FEW_T + 1, k)).astype(np.float32)
    x[1, :32] = 0                                                                   # an all-zero int8 block
    check_rows_alone(q4_cpu.matmul_q4, x, q)
    for t in range(1, len(x) + 1):                                 # and each T against the reference
        ref = q4.matmul_q4(np.empty((t, n), np.float32), x[:t], q)
        got = q4_cpu.matmul_q4(np.empty((t, n), np.float32), x[:t], q)
        assert np.all(np.abs(got - ref) <= 1e-5 * _terms(x[:t], q)[0] + 1e-30)


def test_layout_matches_docstring():
    n, k = 20, 64
    codes = np.random.default_rng(2).integers(0, 16, (n, k), dtype=np.uint8)
    q = q4._pack(codes, np.ones((n, 2), np.float16), None, 32)
    assert q.packed.shape == (2, 8, 64) and q.scales.shape == (2, 2, 16)
    for t, c, r, j in np.ndindex(2, 8, 16, 4):
        byte = int(q.packed[t, c, 4 * r + j])
        row = 16 * t + r
        want = (codes[row, 8 * c + j], codes[row, 8 * c + 4 + j]) if row < n else (0, 0)
        assert (byte & 15, byte >> 4) == want
    assert np.all(q.scales[1, :, n - 16:] == 0)                    # padding rows are zero weights
    np.testing.assert_array_equal(q4.unpack_q4(q)[0], codes)


@pytest.mark.parametrize("sym", [True, False])
def test_dequantize_rows_matches_full_dequantization(sym):
    q = q4.quantize_q4(weights(np.random.default_rng(6), 37, 128), 64, sym)
    ids = np.array([[36, 0], [17, 17]])
    np.testing.assert_array_equal(q4.dequantize_rows(q, ids), q4.dequantize_q4(q)[ids.reshape(-1)])
    for bad in ([-1], [37], [1.5]):
        with pytest.raises(TinyhunError, match="expected integer row ids in 0..36"):
            q4.dequantize_rows(q, bad)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), groups=st.integers(1, 3), group=GROUPS, sym=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_roundtrip_error_within_half_scale(n, groups, group, sym, seed):
    rng = np.random.default_rng(seed)
    w = weights(rng, n, groups * group)
    q = q4.quantize_q4(w, group, sym)
    _, s, _ = q4.unpack_q4(q)
    half = np.repeat(s.astype(np.float32), group, axis=1) / 2
    err = np.abs(q4.dequantize_q4(q) - w)
    assert np.all(err <= half * (1 + 1e-6) + 1e-6 * np.abs(w) + 1e-38)
    assert np.all(err[0] == 0)                                      # zero rows stay exactly zero


@pytest.mark.parametrize("qtype, importer", [(gguf.GGMLQuantizationType.Q4_0, q4.from_gguf_q4_0),
                                             (gguf.GGMLQuantizationType.Q4_1, q4.from_gguf_q4_1)])
def test_gguf_import_is_bit_exact(qtype, importer):
    rng = np.random.default_rng(3)
    n, k = 37, 96
    quantized = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    # arbitrary blocks too: random nibbles and random finite fp16 d (and m), including negative d
    block_bytes = quantized.shape[1] // (k // 32)
    rand = rng.integers(0, 256, (n * k // 32, block_bytes), dtype=np.uint8)
    head = block_bytes - 16
    rand[:, :head] = rng.uniform(-3, 3, (n * k // 32, head // 2)).astype(np.float16).view(np.uint8)
    for raw in (quantized, rand.reshape(n, -1)):
        q = importer(raw, n, k)
        want = gguf.quants.dequantize(raw, qtype).reshape(n, k)
        np.testing.assert_array_equal(q4.dequantize_q4(q).view(np.uint32), want.view(np.uint32))
        x = rng.standard_normal((2, k)).astype(np.float32)
        ref = q4.matmul_q4(np.empty((2, n), np.float32), x, q)
        out = q4_cpu.matmul_q4(np.empty((2, n), np.float32), x, q)
        assert np.all(np.abs(out - ref) <= 1e-5 * _terms(x, q)[0] + 1e-30)


def test_safetensors_roundtrip_and_bad_metadata(tmp_path):
    q = q4.quantize_q4(weights(np.random.default_rng(4), 18, 128), 128, False)
    arrays, meta = check_safetensors_roundtrip(tmp_path, q, q4.Q4Weight, q4.dequantize_q4)
    assert set(arrays) == {"qweight", "scales", "mins"} and meta["sym"] is False
    with pytest.raises(TinyhunError, match="boolean sym"):
        q4.Q4Weight.from_arrays(arrays, {**meta, "sym": "False"})
    with pytest.raises(TinyhunError, match="mins"):
        q4.Q4Weight.from_arrays({"qweight": arrays["qweight"], "scales": arrays["scales"]}, meta)
    with pytest.raises(TinyhunError, match="scales"):
        q4.Q4Weight.from_arrays({**arrays, "scales": arrays["scales"][:1]}, meta)


def test_bad_input_raises():
    w = np.zeros((4, 96), np.float32)
    with pytest.raises(TinyhunError, match="multiple"):
        q4.quantize_q4(w, 64)
    for group in (16, 48, 256):
        with pytest.raises(TinyhunError, match="group"):
            q4.quantize_q4(w, group)
    with pytest.raises(TinyhunError, match="inf or nan"):
        q4.quantize_q4(np.full((2, 32), np.inf, np.float32))
    with pytest.raises(TinyhunError, match="Q4_0"):
        q4.from_gguf_q4_0(np.zeros(17, np.uint8), 1, 32)
    q = q4.quantize_q4(w, 32)
    for mod in (q4, q4_cpu):
        with pytest.raises(TinyhunError, match="shapes"):
            mod.matmul_q4(np.empty((1, 4), np.float32), np.zeros((1, 64), np.float32), q)
        with pytest.raises(TinyhunError, match="float32"):
            mod.matmul_q4(np.empty((1, 4), np.float32), np.zeros((1, 96), np.float64), q)


@pytest.mark.parametrize("vnni", [False, True])
def test_integer_dot_both_code_paths(vnni, monkeypatch):
    """The VPDPBUSD intrinsic and its portable fallback compute the same exact u8 x s8 block dot product."""
    def block(packed, xq, out):
        v = q4_cpu._block_dot(-3, packed, 0, xq, 0)
        cpu_simd._store_f(out, 0, cpu_simd._fma(cpu_simd._splat_f(0.0), v, cpu_simd._splat_f(1.0)))

    rng = np.random.default_rng(5)
    codes = rng.integers(0, 16, (16, 32), dtype=np.uint8)
    xq = rng.integers(-127, 128, 32, dtype=np.int8)
    packed = q4._pack(codes, np.ones((16, 1), np.float16), None, 32).packed
    check_dot_code_paths(vnni, monkeypatch, block, packed, xq, codes.astype(np.int32) @ xq - 3)
