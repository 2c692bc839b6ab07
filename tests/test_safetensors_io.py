"""safetensors_io against the official safetensors package, and every corrupt header."""
import json
import os
import pickle
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy as stnp

from mindformers_dsv3.checkpoint import safetensors_io as sio
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.safetensors_io import SafetensorsFile, open_checkpoint, write_index
from tests import hf_fixtures
from tests.hf_fixtures import write_safetensors

torch = pytest.importorskip("torch")
import safetensors.torch as sttorch  # noqa: E402  (needs torch)

RNG = np.random.default_rng(0)


def _numpy_tensors():
    return {
        "f64": RNG.standard_normal((3, 5)),
        "f32": RNG.standard_normal((4, 7)).astype(np.float32),
        "f16": RNG.standard_normal((9,)).astype(np.float16),
        "i64": RNG.integers(-2**40, 2**40, (2, 3)),
        "i32": RNG.integers(-9, 9, (5,), dtype=np.int32),
        "i16": RNG.integers(-9, 9, (2, 2, 2), dtype=np.int16),
        "i8": RNG.integers(-9, 9, (3,), dtype=np.int8),
        "u8": RNG.integers(0, 255, (6,), dtype=np.uint8),
        "flag": RNG.integers(0, 2, (4,)).astype(bool),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def _torch_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.norm.weight": torch.randn(33, generator=g).to(torch.bfloat16),
        "w.weight": (torch.randn(17, 9, generator=g) * 50).to(torch.float8_e4m3fn),
        "w.weight_scale_inv": torch.rand(1, 1, generator=g),
        "router.bias": torch.randn(8, generator=g),
        "i16": torch.arange(-3, 3, dtype=torch.int16),
        "ids": torch.arange(5, dtype=torch.int64),
    }


def _bytes(t):
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t).reshape(-1).view(np.uint8).tobytes()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------- round trips


def test_reads_numpy_files_written_by_official_library(tmp_path):
    tensors = _numpy_tensors()
    path = tmp_path / "ref.safetensors"
    stnp.save_file(tensors, str(path), metadata={"format": "np"})
    with SafetensorsFile(path) as f:
        assert f.keys() == sorted(tensors)
        assert f.metadata() == {"format": "np"}
        for name, ref in tensors.items():
            got = f.read(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape, name
            assert _bytes(got) == _bytes(ref), name
            assert f.nbytes(name) == ref.nbytes


def test_reads_bf16_fp8_written_by_official_library(tmp_path):
    tensors = _torch_tensors()
    path = tmp_path / "ref.safetensors"
    sttorch.save_file(tensors, str(path))
    with SafetensorsFile(path) as f:
        assert f.dtype("model.norm.weight") == ml_dtypes.bfloat16
        assert f.dtype("w.weight") == ml_dtypes.float8_e4m3fn
        for name, ref in tensors.items():
            got = f.read(name)
            assert got.shape == tuple(ref.shape) and _bytes(got) == _bytes(ref), name
        np.testing.assert_array_equal(f.read("w.weight").astype(np.float32),
                                      tensors["w.weight"].float().numpy())


def test_official_library_reads_what_we_write(tmp_path):
    tensors = _numpy_tensors()
    tensors["bf16"] = RNG.standard_normal((3, 4)).astype(ml_dtypes.bfloat16)
    tensors["fp8"] = RNG.uniform(-400, 400, (5, 6)).astype(ml_dtypes.float8_e4m3fn)
    path = tmp_path / "ours.safetensors"
    size = write_safetensors(path, tensors, metadata={"format": "pt", "note": "ü"})
    assert size == sum(t.nbytes for t in tensors.values())
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "ü"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, ref in tensors.items():
            got = f.get_tensor(name)
            assert tuple(got.shape) == ref.shape and _bytes(got) == _bytes(ref), name
    assert str(sttorch.load_file(str(path))["fp8"].dtype) == "torch.float8_e4m3fn"
    numpy_only = {k: v for k, v in tensors.items() if k not in ("bf16", "fp8")}
    write_safetensors(path, numpy_only)
    loaded = stnp.load_file(str(path))
    for name, ref in numpy_only.items():
        np.testing.assert_array_equal(loaded[name], ref)


def test_output_is_byte_identical_to_reference_writer(tmp_path):
    tensors = _numpy_tensors()
    write_safetensors(tmp_path / "a.safetensors", tensors)
    assert (tmp_path / "a.safetensors").read_bytes() == stnp.save(tensors)
    tt = _torch_tensors()
    write_safetensors(tmp_path / "b.safetensors",
                      {k: SafetensorsFile_read(v) for k, v in tt.items()})
    assert (tmp_path / "b.safetensors").read_bytes() == sttorch.save(tt)
    header_len = struct.unpack("<Q", (tmp_path / "b.safetensors").read_bytes()[:8])[0]
    assert header_len % 8 == 0


def SafetensorsFile_read(t):
    """A torch tensor as the numpy array our reader would give."""
    dtype = {torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn}
    arr = t.contiguous().view(torch.uint8).numpy() if t.dtype in dtype else t.numpy()
    return arr.view(dtype[t.dtype]) if t.dtype in dtype else arr


def test_writer_normalises_layout_and_rejects_bad_input(tmp_path):
    base = RNG.standard_normal((4, 6)).astype(np.float32)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"t": base.T, "be": base.astype(">f4"), "s": base[::2, 1:]})
    with SafetensorsFile(path) as f:
        np.testing.assert_array_equal(f.read("t"), base.T)
        np.testing.assert_array_equal(f.read("be"), base)
        assert f.dtype("be") == np.dtype("<f4")
        np.testing.assert_array_equal(f.read("s"), base[::2, 1:])
    with pytest.raises(CheckpointError, match="unsupported dtype.*complex"):
        write_safetensors(path, {"c": np.zeros(2, np.complex64)})
    with pytest.raises(CheckpointError, match="not a numpy array"):
        write_safetensors(path, {"l": [1, 2]})
    with pytest.raises(CheckpointError, match="metadata"):
        write_safetensors(path, {}, metadata={"a": 1})


# ---------------------------------------------------------------- corrupt headers


def _craft(path, header, data=b"", length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CORRUPT = {
    "bad_json": (b"{not json", b"", None, ["not valid JSON"]),
    "not_object": (b"[1, 2]", b"", None, ["not an object"]),
    "dup_key": (b'{"a.w": {}, "a.w": {}}', b"", None, ["duplicate key", "a.w"]),
    "bad_meta": ({"__metadata__": {"k": 1}}, b"", None, ["__metadata__"]),
    "bad_dtype": ({"layer.w": _entry(dtype="F7")}, b"\0" * 8, "layer.w", ["'F7'"]),
    "offsets_one": ({"layer.w": _entry(offsets=(0,))}, b"\0" * 8, "layer.w",
                    ["data_offsets must be two ints"]),
    "offsets_float": ({"layer.w": _entry(offsets=(0, 8.0))}, b"\0" * 8, "layer.w",
                      ["two ints"]),
    "offsets_bool": ({"layer.w": _entry(offsets=(False, 8))}, b"\0" * 8, "layer.w",
                     ["two ints"]),
    "begin_gt_end": ({"layer.w": _entry(offsets=(8, 0))}, b"\0" * 8, "layer.w",
                     ["not an ordered range"]),
    "past_end": ({"layer.w": _entry(offsets=(0, 8))}, b"\0" * 5, "layer.w",
                 ["truncated", "byte 8", "only 5 bytes"]),
    "size_mismatch": ({"layer.w": _entry(shape=(3,), offsets=(0, 8))}, b"\0" * 8, "layer.w",
                      ["byte size 8", "12 bytes"]),
    "neg_shape": ({"layer.w": _entry(shape=(-2,))}, b"\0" * 8, "layer.w", ["shape"]),
    "overlap": ({"a.w": _entry(offsets=(0, 8)), "b.w": _entry(offsets=(4, 12))},
                b"\0" * 12, "b.w", ["overlaps", "'a.w'"]),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_header_names_file_and_tensor(tmp_path, case):
    header, data, tensor, fragments = CORRUPT[case]
    path = _craft(tmp_path / f"shard-{case}.safetensors", header, data)
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(path)
    msg = str(err.value)
    assert str(path) in msg and err.value.file == str(path)
    if tensor:
        assert repr(tensor) in msg and err.value.tensor == tensor
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_short_huge_and_overlong_header_lengths(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError, match=r"short\.safetensors: file is 3 bytes"):
        SafetensorsFile(short)
    huge = _craft(tmp_path / "huge.safetensors", b"{}", length=2 ** 40)
    with pytest.raises(CheckpointError, match=r"huge\.safetensors: header length .* absurd"):
        SafetensorsFile(huge)
    over = _craft(tmp_path / "over.safetensors", b"{}", length=1000)
    with pytest.raises(CheckpointError, match=r"over\.safetensors: header length 1000 is "
                                              r"larger than the file \(10 bytes\)"):
        SafetensorsFile(over)


def test_header_length_that_looks_like_a_pickle_opcode_is_fine(tmp_path):
    header = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    header += b" " * (0x280 - len(header))  # length bytes 80 02: the pickle protocol 2 opcode
    path = _craft(tmp_path / "x.safetensors", header, b"\x07")
    assert path.read_bytes()[:2] == b"\x80\x02"
    with SafetensorsFile(path) as f:
        assert f.read("a").tolist() == [7]
    with pytest.raises(CheckpointError, match="x.safetensors: tensor 'a': file is closed"):
        f.read("a")


def test_truncated_real_file_names_last_tensor(tmp_path):
    path = tmp_path / "cut.safetensors"
    write_safetensors(path, {"a": np.ones(10, np.float32), "z": np.ones(10, np.float32)})
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: tensor 'z': file is "
                                              r"truncated.*byte 80.*only 77 bytes "
                                              r"\(file has \d+ bytes, needs \d+\)"):
        SafetensorsFile(path)


# ---------------------------------------------------------------- pickle refusal


def test_pickle_files_and_folders_are_refused(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle-based.*never "
                                              "unpickle.*convert to safetensors"):
        open_checkpoint(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle-based.*pytorch_model.bin.*refused"):
        open_checkpoint(tmp_path)
    disguised = tmp_path / "weights.safetensors"  # a zip pickle behind the wrong suffix
    os.rename(tmp_path / "pytorch_model.bin", disguised)
    with pytest.raises(CheckpointError, match="pickle-based"):
        open_checkpoint(disguised)
    (tmp_path / "bare.safetensors").write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    with pytest.raises(CheckpointError, match="bare.safetensors: pickle-based"):
        open_checkpoint(tmp_path / "bare.safetensors")
    for suffix in (".pt", ".pth", ".ckpt"):
        (tmp_path / f"m{suffix}").write_bytes(b"\x80\x04junk")
        with pytest.raises(CheckpointError, match="pickle-based"):
            open_checkpoint(tmp_path / f"m{suffix}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        open_checkpoint(empty)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "absent")


# ---------------------------------------------------------------- folders and the index


def _hf_folder(folder):
    a = {"model.embed_tokens.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
         "model.layers.0.mlp.gate.weight": np.ones((2, 4), np.float32)}
    b = {"model.norm.weight": np.ones(4, ml_dtypes.bfloat16),
         "lm_head.weight": np.full((3, 4), 2, np.float32)}
    total = write_safetensors(folder / "model-00001-of-00002.safetensors", a)
    total += write_safetensors(folder / "model-00002-of-00002.safetensors", b)
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a},
                  **{k: "model-00002-of-00002.safetensors" for k in b}}
    write_index(folder, weight_map, total)
    return {**a, **b}, weight_map


def test_indexed_folder(tmp_path):
    tensors, weight_map = _hf_folder(tmp_path)
    index = json.loads((tmp_path / sio.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for target in (tmp_path, tmp_path / sio.INDEX_NAME):
        with open_checkpoint(target) as ckpt:
            assert ckpt.keys() == sorted(tensors)
            assert ckpt.file_of("lm_head.weight").endswith("model-00002-of-00002.safetensors")
            for name, ref in tensors.items():
                assert ckpt.shape(name) == ref.shape and ckpt.dtype(name) == ref.dtype
                np.testing.assert_array_equal(ckpt.read(name), ref)
            assert ckpt.bytes_read == sum(t.nbytes for t in tensors.values())
            emb = tensors["model.embed_tokens.weight"]
            np.testing.assert_array_equal(ckpt.read_rows("model.embed_tokens.weight", 1, 3),
                                          emb[1:3])
            np.testing.assert_array_equal(
                ckpt.read_slice("model.embed_tokens.weight", 1, 2, 4), emb[:, 2:4])
            assert ckpt.nbytes("lm_head.weight") == 48
            with pytest.raises(CheckpointError) as err:
                ckpt.read("model.embed_token.weight")
            assert "model.embed_token.weight" in str(err.value)
            assert str(tmp_path) in str(err.value)
            assert "closest: ['model.embed_tokens.weight'" in str(err.value)


def test_index_errors(tmp_path):
    tensors, weight_map = _hf_folder(tmp_path)
    bad = dict(weight_map, **{"model.layers.1.x": "model-00003-of-00003.safetensors"})
    write_index(tmp_path, bad, 0)
    with pytest.raises(CheckpointError, match="index.json: the index lists 1 shard.*"
                                              "model-00003-of-00003.safetensors"):
        open_checkpoint(tmp_path)
    bad = dict(weight_map, **{"model.layers.1.x": "model-00001-of-00002.safetensors"})
    write_index(tmp_path, bad, 0)
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: tensor "
                                              "'model.layers.1.x': listed in the index"):
        open_checkpoint(tmp_path)
    bad = dict(weight_map)
    del bad["lm_head.weight"]
    write_index(tmp_path, bad, 0)
    with pytest.raises(CheckpointError, match="00002.safetensors: tensor 'lm_head.weight': "
                                              "1 tensor.*missing from the index"):
        open_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match="missing from the index"):
        with open_checkpoint(tmp_path, strict=False) as ckpt:
            assert "lm_head.weight" not in ckpt
    write_index(tmp_path, {"a": "../outside.safetensors"}, 0)
    with pytest.raises(CheckpointError, match="outside the folder"):
        open_checkpoint(tmp_path)
    (tmp_path / sio.INDEX_NAME).write_text("{oops")
    with pytest.raises(CheckpointError, match="index.json: cannot read index"):
        open_checkpoint(tmp_path)


def test_folder_without_index_and_single_file(tmp_path):
    tensors, _ = _hf_folder(tmp_path)
    os.remove(tmp_path / sio.INDEX_NAME)
    (tmp_path / "stale.bin").write_bytes(b"ignored")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.keys() == sorted(tensors)
    single = tmp_path / "model-00002-of-00002.safetensors"
    with open_checkpoint(single) as ckpt:
        assert ckpt.keys() == ["lm_head.weight", "model.norm.weight"]
    write_safetensors(tmp_path / "dup.safetensors", {"lm_head.weight": np.ones(1, np.int8)})
    with pytest.raises(CheckpointError, match="tensor 'lm_head.weight': tensor is in both"):
        open_checkpoint(tmp_path)


# ---------------------------------------------------------------- partial reads


def test_read_slice_reads_only_the_slice(tmp_path, monkeypatch):
    small = RNG.standard_normal((6, 10, 12)).astype(np.float32)  # inner rows of 48 bytes
    wide = RNG.standard_normal((5, 64, 256)).astype(np.float32)  # inner rows of 1 KiB
    bf = RNG.standard_normal((7, 9)).astype(ml_dtypes.bfloat16)
    path = tmp_path / "s.safetensors"
    write_safetensors(path, {"small": small, "wide": wide, "bf": bf})
    with SafetensorsFile(path) as f:
        assert f.bytes_read == 0  # the header is not counted
        got = f.read_rows("small", 2, 5)
        np.testing.assert_array_equal(got, small[2:5])
        assert f.bytes_read == small[2:5].nbytes
        before = f.bytes_read
        np.testing.assert_array_equal(f.read_slice("wide", 1, 8, 24), wide[:, 8:24])
        assert f.bytes_read - before == wide[:, 8:24].nbytes  # 16 KiB runs: exact
        # Short runs are gathered from one span of whole rows: first run .. last run.
        before = f.bytes_read
        np.testing.assert_array_equal(f.read_slice("small", 1, 3, 5), small[:, 3:5])
        assert f.bytes_read - before == (6 - 1) * 10 * 48 + 2 * 48
        before = f.bytes_read
        np.testing.assert_array_equal(f.read_slice("bf", -1, 4, 9), bf[:, 4:9])
        assert f.bytes_read - before == 6 * 18 + 5 * 2
        monkeypatch.setattr(sio, "CHUNK_BYTES", 100)  # several spans of one row each
        np.testing.assert_array_equal(f.read_slice("small", 2, 0, 1), small[:, :, 0:1])
        np.testing.assert_array_equal(f.read_slice("small", 0, 4, 4), small[4:4])
        np.testing.assert_array_equal(f.read_slice("small", 1, 0, 10), small)
        for args in [("small", 3, 0, 1), ("small", 0, 2, 7), ("small", 0, 3, 2)]:
            with pytest.raises(CheckpointError, match=r"s\.safetensors: tensor 'small'"):
                f.read_slice(*args)


# ---------------------------------------------------------------- atomic writes


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"old": np.ones(3, np.float32)})
    old = path.read_bytes()
    real, calls = hf_fixtures._tensor_bytes, []

    def explode(arr):
        calls.append(arr)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(arr)

    monkeypatch.setattr(hf_fixtures, "_tensor_bytes", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_safetensors(path, {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    calls.clear()
    with pytest.raises(RuntimeError):
        write_safetensors(tmp_path / "new.safetensors",
                          {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_written_file_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_safetensors(tmp_path / "m.safetensors", {"a": np.ones(1, np.int8)})
        path = write_index(tmp_path, {"a": "m.safetensors"}, 1)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.safetensors").st_mode & 0o777 == 0o640
    assert os.stat(path).st_mode & 0o777 == 0o640


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.uint8])
def test_read_block_into_fills_a_given_buffer_with_the_block(tmp_path, dtype):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((40, 3000)) * 10).astype(dtype)
    path = tmp_path / "b.safetensors"
    write_safetensors(path, {"w": a})
    with sio.open_checkpoint(path) as ckpt:
        # whole rows (one read), long runs (one read per row), short runs (rows through a temporary)
        for r0, r1, c0, c1 in ((3, 17, 0, 3000), (0, 40, 100, 2900), (5, 9, 7, 11), (2, 2, 0, 5), (0, 40, 0, 0)):
            buf = np.full((r1 - r0) * (c1 - c0) * a.itemsize, 0xAB, np.uint8)
            ckpt.read_block_into("w", r0, r1, c0, c1, buf)
            assert buf.tobytes() == np.ascontiguousarray(a[r0:r1, c0:c1]).tobytes()
        with pytest.raises(CheckpointError, match=r"b\.safetensors.*'w'.*out of range"):
            ckpt.read_block_into("w", 0, 41, 0, 1, np.empty(41 * a.itemsize, np.uint8))
        with pytest.raises(CheckpointError, match=r"b\.safetensors.*'w'.*buffer of 3 bytes"):
            ckpt.read_block_into("w", 0, 1, 0, 1, np.empty(3, np.uint8))


# ---------------------------------------------------------------- what the reader opens (issue 10)
def _read_all(folder):
    with open_checkpoint(folder) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.keys()}


def _outside_message(link):
    return f"{link}: resolves outside the checkpoint folder"


def test_links_inside_the_folder_are_read_and_links_out_of_it_are_refused(tmp_path):
    folder, outside = tmp_path / "ckpt", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    tensors, weight_map = _hf_folder(folder)
    shard = "model-00002-of-00002.safetensors"
    os.rename(folder / shard, folder / "real.safetensors.data")
    os.symlink("real.safetensors.data", folder / shard)  # a link inside: fine
    assert set(_read_all(folder)) == set(tensors)
    os.rename(folder / "real.safetensors.data", outside / shard)
    os.remove(folder / shard)
    os.symlink(outside / shard, folder / shard)  # the same shard, out of the folder
    with pytest.raises(CheckpointError, match=_outside_message(folder / shard)):
        open_checkpoint(folder)
    os.remove(folder / sio.INDEX_NAME)  # without an index, every *.safetensors is checked alike
    with pytest.raises(CheckpointError, match=_outside_message(folder / shard)):
        open_checkpoint(folder)
    write_index(folder, weight_map, 0)
    os.remove(folder / shard)  # an index entry through a linked folder
    os.symlink(outside, folder / "sub")
    write_index(folder, {k: ("sub/" + v if v == shard else v) for k, v in weight_map.items()}, 0)
    with pytest.raises(CheckpointError, match=_outside_message(folder / "sub" / shard)):
        open_checkpoint(folder)
    os.replace(folder / sio.INDEX_NAME, outside / sio.INDEX_NAME)  # the index itself linked out
    os.symlink(outside / sio.INDEX_NAME, folder / sio.INDEX_NAME)
    with pytest.raises(CheckpointError, match=_outside_message(folder / sio.INDEX_NAME)):
        open_checkpoint(folder)
    with open_checkpoint(outside / shard) as one:  # a file named by the caller is the caller's choice
        assert "lm_head.weight" in one


def test_huggingface_cache_snapshots_read_their_blobs(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    tensors, _ = _hf_folder(plain)
    repo = tmp_path / "hub" / "models--org--name"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(plain))):
        os.rename(plain / name, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / name)
    got = _read_all(snap)
    assert all(got[n].tobytes() == tensors[n].tobytes() for n in tensors)
    # the exception is the snapshot's own repository, not any folder named blobs
    other = tmp_path / "hub" / "models--x--y" / "blobs"
    other.mkdir(parents=True)
    shard = "model-00001-of-00002.safetensors"
    os.replace(os.path.realpath(snap / shard), other / "stolen")
    os.remove(snap / shard)
    os.symlink("../../../models--x--y/blobs/stolen", snap / shard)
    with pytest.raises(CheckpointError, match=_outside_message(snap / shard)):
        open_checkpoint(snap)


def _refused_within_a_second(call, *args):
    """The CheckpointError `call(*args)` raises; fails (not hangs) when it blocks a second."""
    import threading
    import time
    got = []

    def target():
        try:
            call(*args)
        except CheckpointError as exc:
            got.append(exc)
    t0 = time.time()
    thread = threading.Thread(target=target, daemon=True)  # left blocked for good if open() blocks
    thread.start()
    thread.join(1.0)
    assert got and time.time() - t0 < 1.0, f"{call.__name__}{args} blocked or did not refuse"
    return str(got[0])


def test_fifos_devices_and_folders_are_refused_at_once(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)  # nobody writes: a blocking open would never return
    for call, target in ((open_checkpoint, fifo), (open_checkpoint, tmp_path), (SafetensorsFile, fifo)):
        assert "model.safetensors: is a FIFO, not a regular file" in _refused_within_a_second(call, target)
    os.remove(fifo)
    (tmp_path / "x.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="x.safetensors: is a folder, not a regular file"):
        open_checkpoint(tmp_path)
    os.rmdir(tmp_path / "x.safetensors")
    _hf_folder(tmp_path)
    os.remove(tmp_path / sio.INDEX_NAME)
    os.mkfifo(tmp_path / sio.INDEX_NAME)
    assert "index.json: is a FIFO" in _refused_within_a_second(open_checkpoint, tmp_path)
    os.remove(tmp_path / sio.INDEX_NAME)
    if os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", tmp_path / "zero.safetensors")
        with pytest.raises(CheckpointError, match="zero.safetensors: resolves outside"):
            open_checkpoint(tmp_path)
        with pytest.raises(CheckpointError, match="zero.safetensors: is a character device"):
            SafetensorsFile(tmp_path / "zero.safetensors")
