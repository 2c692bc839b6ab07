"""Block FP8 against torch's float8_e4m3fn and a loop-based reference."""
import math

import ml_dtypes
import numpy as np
import pytest

from mindformers_dsv3.checkpoint import fp8 as fp8_module
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fp8 import (
    FP8, block_size_of, check_scale, check_scale_values, dequantize_into, is_fp8_config, scale_inv_shape)
from mindformers_dsv3.checkpoint.safetensors_io import open_checkpoint
from tests.fp8_reference import dequantize_block_fp8, quantize_block_fp8
from tests.hf_fixtures import write_safetensors

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(1)
DSV3_QC = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
           "activation_scheme": "dynamic"}


def _to_torch_fp8(a):
    return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).view(torch.float8_e4m3fn)


def _loop_dequant(q, s, block=(128, 128)):
    out = np.zeros(q.shape, np.float64)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            out[i, j] = float(q[i, j]) * float(s[i // block[0], j // block[1]])
    return out


def test_cast_matches_torch_both_ways():
    codes = np.arange(256, dtype=np.uint8)
    ours = codes.view(FP8).astype(np.float32)
    theirs = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_array_equal(ours[~np.isnan(ours)], theirs[~np.isnan(theirs)])
    finite = ours[np.isfinite(ours)]
    midpoints = (np.sort(finite)[1:] + np.sort(finite)[:-1]) / 2  # round-half-even ties
    x = np.concatenate([RNG.uniform(-448, 448, 5000), RNG.standard_normal(2000) * 1e-2,
                        midpoints, [0.0, -0.0, 448.0, -448.0, 2.0 ** -9, 2.0 ** -10]])
    x = x.astype(np.float32)
    ours = x.astype(FP8).view(np.uint8)
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("shape,block", [((200, 300), (128, 128)), ((130, 129), (128, 128)),
                                         ((128, 256), (128, 128)), ((70, 50), (64, 32)),
                                         ((5, 7), (128, 128))])
def test_dequantize_matches_loop_and_torch(shape, block):
    q = RNG.uniform(-448, 448, shape).astype(np.float32).astype(FP8)
    s = RNG.uniform(1e-4, 1e-2, scale_inv_shape(shape, block)).astype(np.float32)
    got = dequantize_block_fp8(q, s, block=block)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, _loop_dequant(q, s, block).astype(np.float32))
    tq = _to_torch_fp8(q).float()
    ts = torch.from_numpy(s).repeat_interleave(block[0], 0)[:shape[0]]
    ts = ts.repeat_interleave(block[1], 1)[:, :shape[1]]
    np.testing.assert_array_equal(got, (tq * ts).numpy())
    bf = dequantize_block_fp8(q, s, block=block, out_dtype=ml_dtypes.bfloat16)
    assert bf.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf, got.astype(ml_dtypes.bfloat16))


def test_dequantize_rejects_bad_inputs():
    q = np.zeros((200, 300), FP8)
    with pytest.raises(CheckpointError) as err:
        dequantize_block_fp8(q, np.ones((2, 2), np.float32), name="model.layers.3.mlp.w1")
    msg = str(err.value)
    assert "(2, 2)" in msg and "(200, 300)" in msg and "(2, 3)" in msg
    assert "'model.layers.3.mlp.w1'" in msg
    assert isinstance(err.value, ValueError)
    with pytest.raises(CheckpointError, match="expected float8_e4m3fn"):
        dequantize_block_fp8(np.zeros((2, 2), np.float32), np.ones((1, 1), np.float32))
    with pytest.raises(CheckpointError, match="2-D"):
        dequantize_block_fp8(np.zeros(4, FP8), np.ones(1, np.float32))
    with pytest.raises(ValueError, match="block"):
        dequantize_block_fp8(q, np.ones((2, 3), np.float32), block=(128,))


def _torch_reference_quant(w, block):
    """DeepSeek's recipe in torch: s = amax / 448 per block, q = (w / s) -> e4m3fn."""
    t = torch.from_numpy(w)
    q = torch.empty(t.shape, dtype=torch.float8_e4m3fn)
    rows, cols = t.shape
    s = torch.ones(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            sl = (slice(bi * block[0], (bi + 1) * block[0]),
                  slice(bj * block[1], (bj + 1) * block[1]))
            amax = t[sl].abs().max()
            if amax > 0:
                s[bi, bj] = amax / 448
            q[sl] = (t[sl] / s[bi, bj]).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).numpy(), s.numpy()


@pytest.mark.parametrize("shape,block", [((200, 300), (128, 128)), ((70, 50), (64, 32))])
def test_quantize_matches_torch_recipe_and_error_bound(shape, block):
    w = (RNG.standard_normal(shape) * np.exp(RNG.uniform(-6, 3, shape))).astype(np.float32)
    w[:block[0], :block[1]] = 0.0  # an all-zero block
    q, s = quantize_block_fp8(w, block)
    assert q.dtype == FP8 and s.dtype == np.float32 and s.shape == scale_inv_shape(shape, block)
    assert s[0, 0] == 1.0
    ref_q, ref_s = _torch_reference_quant(w, block)
    np.testing.assert_array_equal(s, ref_s)
    np.testing.assert_array_equal(q.view(np.uint8), ref_q)
    back = dequantize_block_fp8(q, s, block)
    assert np.isfinite(back).all()
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            sl = (slice(bi * block[0], (bi + 1) * block[0]),
                  slice(bj * block[1], (bj + 1) * block[1]))
            amax = np.abs(w[sl]).max()
            err = np.abs(back[sl] - w[sl])
            assert err.max() <= 2.0 ** -3 * amax + 1e-30
            # elementwise: half an e4m3 ulp (2^-4 relative) or half the smallest subnormal
            assert (err <= 2.0 ** -4 * np.abs(w[sl]) + 2.0 ** -10 * s[bi, bj] * 1.0001).all()


def test_quantize_is_nan_free_for_large_values_and_refuses_non_finite():
    w = np.array([[1e30, -3e38, 1e-30, 0.0], [448.0, 449.0, -1e5, 7.0]], np.float32)
    q, s = quantize_block_fp8(w)
    back = dequantize_block_fp8(q, s)
    assert not np.isnan(q.astype(np.float32)).any() and np.isfinite(back).all()
    assert np.abs(back[0, 1] - w[0, 1]) <= 2.0 ** -4 * 3e38
    assert float(q[0, 1]) == -448.0  # the block amax lands exactly on the edge
    for bad in (np.inf, np.nan):
        with pytest.raises(ValueError, match="NaN or infinity"):
            quantize_block_fp8(np.array([[1.0, bad]], np.float32))
    q, s = quantize_block_fp8(np.zeros((0, 5), np.float32))
    assert q.shape == (0, 5) and s.shape == (0, 1)


def test_synthetic_fp8_checkpoint_in_hf_layout(tmp_path):
    """A 576 x 700 kv_a_proj-like weight (edges not multiples of 128) through a shard."""
    w = RNG.standard_normal((576, 700)).astype(np.float32) * 0.02
    q, s = quantize_block_fp8(w)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa"
    write_safetensors(tmp_path / "model.safetensors",
                      {f"{name}.weight": q, f"{name}.weight_scale_inv": s})
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.dtype(f"{name}.weight") == FP8
        assert ckpt.shape(f"{name}.weight_scale_inv") == (5, 6)
        back = dequantize_block_fp8(ckpt.read(f"{name}.weight"),
                                    ckpt.read(f"{name}.weight_scale_inv"), name=name)
    np.testing.assert_allclose(back, w, rtol=2.0 ** -4, atol=2.0 ** -10 * s.max())
    import safetensors.torch as sttorch
    t = sttorch.load_file(str(tmp_path / "model.safetensors"))
    tw = t[f"{name}.weight"].float() * t[f"{name}.weight_scale_inv"].repeat_interleave(
        128, 0)[:576].repeat_interleave(128, 1)[:, :700]
    np.testing.assert_array_equal(back, tw.numpy())


def test_quantization_config_helpers():
    assert is_fp8_config(DSV3_QC) is True
    assert block_size_of(DSV3_QC) == (128, 128)
    assert block_size_of(dict(DSV3_QC, weight_block_size=[64, 32])) == (64, 32)
    assert is_fp8_config(None) is False and is_fp8_config({}) is False
    for qc, key in [({"quant_method": "gptq"}, "quant_method"),
                    (dict(DSV3_QC, fmt="e5m2"), "fmt"),
                    (dict(DSV3_QC, activation_scheme="static"), "activation_scheme")]:
        with pytest.raises(ValueError, match=f"quantization_config.{key}="):
            is_fp8_config(qc)
    for size in (None, [128], [0, 128], "128x128", [128.0, 128]):
        qc = dict(DSV3_QC, weight_block_size=size)
        if size is None:
            del qc["weight_block_size"]
        with pytest.raises(ValueError, match="weight_block_size"):
            block_size_of(qc)
    with pytest.raises(ValueError, match="not FP8"):
        block_size_of(None)


@pytest.mark.parametrize("out_dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("shape,block", [((300, 700), (128, 128)), ((130, 200), (64, 32)), ((1, 3), (64, 64))])
def test_dequantize_into_rounds_once_from_float32(shape, block, out_dtype):
    """Every code (all 256, NaN included) times scales from 1e-12 to 1e6, each float32 product rounded once."""
    codes = RNG.integers(0, 256, shape, dtype=np.uint8).view(FP8)
    scale = (10.0 ** RNG.uniform(-12, 6, scale_inv_shape(shape, block))).astype(np.float32)
    want = (_loop_dequant(codes, scale, block).astype(np.float32)).astype(out_dtype)
    out = np.empty(shape, out_dtype)
    assert dequantize_into(codes, scale, out, block) is out
    bits = np.dtype(f"u{np.dtype(out_dtype).itemsize}")
    np.testing.assert_array_equal(out.view(bits), want.view(bits))


def test_scale_checks_name_the_file_and_tensor():
    with pytest.raises(CheckpointError, match=r"/ckpt/a.safetensors: tensor 'w_scale_inv': .*expected \(2, 1\) "
                                              r"for 64x128 blocks"):
        check_scale((100, 7), (1, 1), np.float32, (64, 128), "/ckpt/a.safetensors", "w_scale_inv")
    with pytest.raises(CheckpointError, match="dtype is int32"):
        check_scale((100, 7), (1, 1), np.int32, (128, 128))
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(CheckpointError, match=r"tensor 's': weight_scale_inv holds NaN or infinity \(first at "
                                                  r"block \(1, 0\)\)"):
            check_scale_values(np.array([[1.0, 2.0], [bad, 1.0]], np.float32), tensor="s")
    check_scale_values(np.ones((2, 2), np.float32))


def _torch_dequant(codes, scale, block, origin, dtype):
    """torch: float8 -> float32, times each element's block scale (repeat_interleave), rounded once to
    `dtype` (bfloat16 / float16 / float32): independent of fp8.py."""
    (br, bc), (r0, c0), (rows, cols) = block, origin, codes.shape
    t = _to_torch_fp8(codes).float()
    s = torch.from_numpy(np.ascontiguousarray(scale))
    s = s.repeat_interleave(br, 0)[r0 % br:r0 % br + rows].repeat_interleave(bc, 1)[:, c0 % bc:c0 % bc + cols]
    want = {np.dtype(ml_dtypes.bfloat16): torch.bfloat16, np.dtype(np.float16): torch.float16,
            np.dtype(np.float32): torch.float32}[np.dtype(dtype)]
    return (t * s).to(want).view({2: torch.int16, 4: torch.int32}[np.dtype(dtype).itemsize]).numpy()


@pytest.mark.parametrize("shape,block,origin", [((576, 7168), (128, 128), (0, 0)),  # kv_a_proj edge
                                                ((129, 130), (128, 128), (0, 0)),
                                                ((300, 200), (64, 32), (70, 33)),  # a chunk off the grid
                                                ((1, 5), (128, 128), (0, 0))])
@pytest.mark.parametrize("out_dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
def test_threaded_decode_equals_one_thread_and_torch(monkeypatch, shape, block, origin, out_dtype):
    """Decoding split over 2 / 3 / 8 threads (row ranges of whole blocks) gives the bits of one thread and of
    torch's float8 cast; the splits really happened (more than one part decoded)."""
    rows, cols = shape
    codes = RNG.integers(0, 256, shape, dtype=np.uint8).view(FP8)  # NaN codes included
    full = scale_inv_shape((origin[0] + rows, origin[1] + cols), block)
    scale = (10.0 ** RNG.uniform(-8, 4, full)).astype(np.float32)[origin[0] // block[0]:, origin[1] // block[1]:]
    single = dequantize_into(codes, scale, np.empty(shape, out_dtype), block, origin, threads=1)
    bits = np.dtype(f"i{np.dtype(out_dtype).itemsize}")
    nan = np.isnan(single.astype(np.float32))
    np.testing.assert_array_equal(nan, np.isin(codes.view(np.uint8), (0x7F, 0xFF)))  # e4m3fn's two NaN codes
    np.testing.assert_array_equal(single.view(bits)[~nan], _torch_dequant(codes, scale, block, origin, out_dtype)[~nan])
    parts = []
    real = fp8_module._dequantize_rows
    monkeypatch.setattr(fp8_module, "_dequantize_rows", lambda c, *a: (parts.append(len(c)), real(c, *a)))
    if rows * cols < 2 * fp8_module.MIN_SPLIT_ELEMS:
        monkeypatch.setattr(fp8_module, "MIN_SPLIT_ELEMS", 1)  # split small shapes too
    for threads in (2, 3, 8):
        parts.clear()
        out = np.full(shape, np.nan, out_dtype)
        assert dequantize_into(codes, scale, out, block, origin, threads=threads) is out
        np.testing.assert_array_equal(out.view(bits), single.view(bits), err_msg=f"{threads} threads")
        most = min(threads, rows * cols // fp8_module.MIN_SPLIT_ELEMS)  # at least MIN_SPLIT_ELEMS per part
        assert sum(parts) == rows and len(parts) == len(fp8_module.split_rows(rows, most, block[0], origin[0]))
        assert len(parts) > 1 or rows <= block[0] - origin[0] % block[0]  # one row block cannot be split


def test_split_rows_covers_whole_blocks():
    for rows, parts, align, origin in [(576, 2, 128, 0), (7168, 3, 128, 0), (129, 2, 128, 0), (300, 4, 64, 70),
                                       (5, 8, 1, 0), (100, 2, 128, 0)]:
        ranges = fp8_module.split_rows(rows, parts, align, origin)
        assert ranges[0][0] == 0 and ranges[-1][1] == rows and len(ranges) <= parts
        assert all(a < b and b == c for (a, b), (c, _) in zip(ranges, ranges[1:] + [(rows, None)]))
        assert all((origin + a) % align == 0 for a, _ in ranges[1:]), ranges
    assert fp8_module.split_rows(576, 2, 128) == [(0, 256), (256, 576)]


def test_load_threads_from_affinity_or_env(monkeypatch):
    import os
    monkeypatch.delenv(fp8_module.THREADS_ENV, raising=False)
    assert fp8_module.load_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(fp8_module.THREADS_ENV, "3")
    assert fp8_module.load_threads() == 3
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(fp8_module.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=f"DSV3_LOAD_THREADS='{bad}' must be a positive integer"):
            fp8_module.load_threads()


def test_run_parts_raises_after_every_part_finished():
    import threading
    import time
    done, lock = [], threading.Lock()

    def work(a, b):
        if a == 0:
            raise RuntimeError("part 0 failed")
        time.sleep(0.05)
        with lock:
            done.append(a)
    with pytest.raises(RuntimeError, match="part 0 failed"):
        fp8_module.run_parts(work, [(0, 1), (1, 2), (2, 3)])
    assert sorted(done) == [1, 2]  # the others had stopped writing before the error came back
