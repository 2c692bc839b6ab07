"""dsv3-convert under an adversarial but realistic user: links out of the input, a killed parent,
Ctrl-C, two runs into one folder, FIFOs, a full disk, nonsense scales, a doctored finished file.

Every case drives the real command line in a subprocess (`python -m mindformers_dsv3.checkpoint.cli`)
on a tiny FP8 checkpoint (several shards and an index) and checks what a user sees: one line on
stderr, no traceback, the exit status, and what is (not) on disk. Outputs that must be complete are
compared byte for byte with an uninterrupted in-process conversion of the same input.
"""
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mindformers_dsv3.checkpoint import names, transform
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fsguard import LOCK_NAME
from mindformers_dsv3.checkpoint.safetensors_io import INDEX_NAME, SafetensorsFile, open_checkpoint
from tests import hf_fixtures as hf
from tests.test_convert import QC, digest, quantize_state, save_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "mindformers_dsv3.checkpoint.cli"]
ENV = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=ROOT)
O_PROJ = "model.layers.1.self_attn.o_proj.weight"
SECRET = b"TOP-SECRET-0123456789"


@pytest.fixture(scope="module")
def fp8_state():
    config = hf.tiny_hf_config()
    return dict(config, quantization_config=QC, torch_dtype="bfloat16"), quantize_state(
        hf.random_hf_state_dict(config, seed=3))


@pytest.fixture(scope="module")
def src(fp8_state, tmp_path_factory):
    return save_folder(tmp_path_factory.mktemp("safety") / "hf", *fp8_state,
                       extra_files={"tokenizer_config.json": '{"model_max_length": 128}\n'})


@pytest.fixture(scope="module")
def ref(src, tmp_path_factory):
    """An uninterrupted conversion: what every resumed or contended run must end up byte-identical to."""
    out = tmp_path_factory.mktemp("ref") / "ms"
    transform.convert("hf-to-ms", src, out, dtype="bf16", progress=False)
    return digest(out)


def cli(*args, timeout=300, **kw):
    return subprocess.run(CLI + [str(a) for a in args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout, **kw)


def one_line(proc, status=1):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status and len(lines) == 1 and "Traceback" not in proc.stderr, (
        proc.returncode, proc.stderr)
    return lines[0]


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def wait_stopped(proc, timeout=120):
    """Waits until `proc` stopped itself (the hidden --debug-stop-after hook: SIGSTOP, like Ctrl-Z)."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read()}")
        with open(f"/proc/{proc.pid}/stat", encoding="utf-8") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError("the run never stopped")


def spawn(*args):
    return subprocess.Popen(CLI + [str(a) for a in args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def manifest_of(out):
    with open(os.path.join(out, transform.MANIFEST_NAME), encoding="utf-8") as fh:
        return json.load(fh)


def sha256(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def all_bytes(folder):
    return b"".join(open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(folder) for f in fs)


# ----------------------------------------------------------------------------- 1. nothing read outside the input
def refused_within_a_second(call, what):
    """The CheckpointError `call` raises, asserted to come within a second (run in a daemon thread: a blocking
    open would hang there for good, not here)."""
    errors = []

    def run():
        try:
            call()
        except CheckpointError as exc:
            errors.append(exc)
    t0 = time.time()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(1.0)
    assert errors and time.time() - t0 < 1.0, f"{what}: blocked, or no CheckpointError"
    return errors[0]


def test_a_small_file_linking_out_of_the_input_is_refused_and_leaks_nothing(src, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    leaky = copy_folder(src, tmp_path / "in")
    os.remove(leaky / "tokenizer_config.json")
    os.symlink(secret, leaky / "tokenizer_config.json")
    out = tmp_path / "out"
    line = one_line(cli("hf-to-ms", leaky, out, "--quiet"))
    assert f"{leaky}/tokenizer_config.json: resolves outside the checkpoint folder" in line
    assert not out.exists() or SECRET not in all_bytes(out)
    with pytest.raises(CheckpointError, match="tokenizer_config.json: resolves outside"):
        transform.convert("hf-to-ms", leaky, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_a_shard_under_a_linked_folder_is_refused_by_reader_and_converter(src, tmp_path):
    inp = copy_folder(src, tmp_path / "in")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = "model-00002-of-00003.safetensors"
    os.rename(inp / shard, elsewhere / shard)
    os.symlink(elsewhere, inp / "sub")  # passes the `..` check of the index entries
    index = json.loads((inp / INDEX_NAME).read_text())
    index["weight_map"] = {k: ("sub/" + v if v == shard else v) for k, v in index["weight_map"].items()}
    (inp / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"sub/{shard}: resolves outside the checkpoint folder"):
        open_checkpoint(inp)
    line = one_line(cli("hf-to-ms", inp, tmp_path / "out", "--quiet"))
    assert f"sub/{shard}: resolves outside" in line and not (tmp_path / "out").exists()


def _hf_cache(plain, cache, repo="models--deepseek-ai--tiny"):
    """The HuggingFace hub cache layout of `plain`: blobs by sha256, snapshot entries as relative links."""
    blobs, snap = cache / repo / "blobs", cache / repo / "snapshots" / ("ab" * 20)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in sorted(os.listdir(plain)):
        blob = sha256(plain / name)
        shutil.copyfile(plain / name, blobs / blob)
        os.symlink(f"../../blobs/{blob}", snap / name)
    return snap


def test_the_huggingface_cache_layout_opens_and_converts_byte_identically(src, ref, tmp_path):
    snap = _hf_cache(src, tmp_path / "hub")
    with open_checkpoint(snap) as ckpt, open_checkpoint(src) as plain:
        assert ckpt.keys() == plain.keys()
        assert all(ckpt.read(n).tobytes() == plain.read(n).tobytes() for n in ckpt.keys())
    out = tmp_path / "out"
    done = cli("hf-to-ms", snap, out, "--dtype", "bf16", "--quiet")
    assert done.returncode == 0, done.stderr
    assert digest(out) == ref
    # the rule is the repository's own blobs/: a link into another repository's blobs is refused
    other = _hf_cache(src, tmp_path / "hub", repo="models--someone--else")
    os.remove(snap / "tokenizer_config.json")
    os.symlink(f"../../../models--someone--else/blobs/{sha256(other / 'tokenizer_config.json')}",
               snap / "tokenizer_config.json")
    assert "resolves outside" in one_line(cli("hf-to-ms", snap, tmp_path / "out2", "--quiet"))


def test_the_loader_reads_the_cache_layout_and_refuses_a_link_out(src, tmp_path):
    from tests.model_fixtures import build_ms_model
    snap = _hf_cache(src, tmp_path / "hub")
    cached, plain = build_ms_model(snap), build_ms_model(src)
    want = {p.name: p.asnumpy() for p in plain.get_parameters()}
    got = {p.name: p.asnumpy() for p in cached.get_parameters()}
    assert got.keys() == want.keys() and all(np.array_equal(got[n], want[n]) for n in want)
    shard = "model-00001-of-00003.safetensors"
    os.replace(os.path.realpath(snap / shard), tmp_path / "elsewhere")
    os.remove(snap / shard)
    os.symlink(tmp_path / "elsewhere", snap / shard)
    with pytest.raises(CheckpointError, match=f"{shard}: resolves outside the checkpoint folder"):
        build_ms_model(snap)


def test_the_loader_refuses_a_config_json_fifo_within_a_second_and_a_link_out(src, tmp_path):
    """The loader reads config.json (the FP8 block size) through the reader's guard: a FIFO there does not
    hang it, a link out of the folder is refused naming the link, and no parameter changes."""
    from mindformers_dsv3 import DeepseekV3ForCausalLM, load_hf_checkpoint
    from mindformers_dsv3.config import DeepseekV3Config
    from tests.model_fixtures import TINY_RUNTIME
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf_config(str(src), **TINY_RUNTIME, use_past=True))
    before = {p.name: p.asnumpy().copy() for p in model.get_parameters()}
    inp = copy_folder(src, tmp_path / "in")
    shutil.copy(inp / "config.json", tmp_path / "outside.json")
    os.remove(inp / "config.json")
    os.mkfifo(inp / "config.json")
    error = refused_within_a_second(lambda: load_hf_checkpoint(model, str(inp)), "the loader, on a FIFO config.json")
    assert f"{inp / 'config.json'}: is a FIFO, not a regular file" in str(error)
    os.remove(inp / "config.json")
    os.symlink(tmp_path / "outside.json", inp / "config.json")
    with pytest.raises(CheckpointError, match=f"{inp / 'config.json'}: resolves outside the checkpoint folder"):
        load_hf_checkpoint(model, str(inp))
    assert all(np.array_equal(p.asnumpy(), before[p.name]) for p in model.get_parameters())
    os.remove(inp / "config.json")
    shutil.move(str(tmp_path / "outside.json"), str(inp / "real.json"))
    os.symlink("real.json", inp / "config.json")  # a link inside the folder is read as before
    assert load_hf_checkpoint(model, str(inp)) > 0


# ----------------------------------------------------------------------------- 3. orphans, Ctrl-C
def _children(pid):
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmd = fh.read()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out[int(entry)] = cmd
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_of_the_parent_leaves_no_worker_alive_5_s_later(src, tmp_path):
    proc = spawn("hf-to-ms", src, tmp_path / "out", "--workers", "2", "--quiet", "--debug-stop-after", "1")
    try:
        wait_stopped(proc)
        workers = [p for p, cmd in _children(proc.pid).items() if b"spawn_main" in cmd]
        assert len(workers) == 2, _children(proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    end = time.time() + 5
    while time.time() < end and any(map(_alive, workers)):
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "workers outlived their parent"


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_gives_one_line_and_a_resumable_folder(src, ref, tmp_path, workers):
    out = tmp_path / "out"
    proc = spawn("hf-to-ms", src, out, "--dtype", "bf16", "--quiet", "--workers", workers, "--debug-stop-after", "2")
    wait_stopped(proc)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole foreground group
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], (proc.returncode, err)
    manifest = manifest_of(out)
    assert not manifest["complete"] and len(manifest["files"]) >= 2
    for name, record in manifest["files"].items():  # every recorded file is there, whole
        assert sha256(out / name) == record["sha256"], name
    assert not [n for n in os.listdir(out) if n.endswith(".tmp") or n == LOCK_NAME]
    resumed = transform.convert("hf-to-ms", src, out, dtype="bf16", progress=False)  # what the CLI calls
    assert resumed["resumed_files"] == len(manifest["files"])
    assert transform.check(out)["verified"] == "sha256" and digest(out) == ref


# ----------------------------------------------------------------------------- 4. one run per output folder
def test_a_second_identical_run_is_refused_naming_the_holder_and_the_first_completes(src, ref, tmp_path):
    out = tmp_path / "out"
    args = ("hf-to-ms", src, out, "--dtype", "bf16", "--quiet")
    first = spawn(*args, "--debug-stop-after", "1")
    try:
        wait_stopped(first)
        before = sorted(os.listdir(out))
        second = cli(*args)
        line = one_line(second)
        assert f"in use by another dsv3-convert (pid {first.pid} on host {socket.gethostname()}" in line
        assert sorted(os.listdir(out)) == before  # the refused run touched nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert transform.check(out)["verified"] == "sha256" and digest(out) == ref


def test_a_lock_left_by_a_dead_run_does_not_block(src, ref, tmp_path):
    out = tmp_path / "out"
    killed = cli("hf-to-ms", src, out, "--dtype", "bf16", "--quiet", "--debug-kill-after", "2",
                 start_new_session=True)
    assert killed.returncode == -signal.SIGKILL and (out / LOCK_NAME).exists()
    transform.convert("hf-to-ms", src, out, dtype="bf16", progress=False)
    assert digest(out) == ref and not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- 5. non-regular files, a full disk
def test_a_fifo_named_like_a_shard_is_refused_within_a_second(src, tmp_path):
    inp = copy_folder(src, tmp_path / "in")
    shard = inp / "model-00002-of-00003.safetensors"
    os.remove(shard)
    os.mkfifo(shard)
    error = refused_within_a_second(lambda: open_checkpoint(inp), "the reader, on a FIFO shard")
    assert "model-00002-of-00003.safetensors: is a FIFO, not a regular file" in str(error)
    t0 = time.time()
    line = one_line(cli("hf-to-ms", inp, tmp_path / "out", "--quiet", timeout=60))
    assert "is a FIFO" in line and not (tmp_path / "out").exists()
    print(f"CLI refused the FIFO in {time.time() - t0:.2f} s (start-up included)")


def _config_list(d):
    (d / "config.json").write_text("[1, 2]")


def _config_fifo(d):
    os.remove(d / "config.json")
    os.mkfifo(d / "config.json")


def _folder_named_like_a_shard(d):
    os.remove(d / INDEX_NAME)
    (d / "x.safetensors").mkdir()


def _nan_scale(d, value=np.nan):
    path = d / json.loads((d / INDEX_NAME).read_text())["weight_map"][O_PROJ + names.SCALE_SUFFIX]
    with SafetensorsFile(path) as f:
        info = f.info(O_PROJ + names.SCALE_SUFFIX)
        offset = f._data_start + info.begin
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = np.float32(value).tobytes()
    path.write_bytes(bytes(data))


BAD = {
    "config.json is a JSON list": (_config_list, "hf-to-ms", "config.json: cannot read the model config: a JSON list"),
    "config.json is a FIFO": (_config_fifo, "hf-to-ms", "config.json: is a FIFO, not a regular file"),
    "a folder named x.safetensors": (_folder_named_like_a_shard, "hf-to-ms",
                                     "x.safetensors: is a folder, not a regular file"),
    "NaN scale": (_nan_scale, "hf-to-ms", f"tensor '{O_PROJ}_scale_inv': weight_scale_inv holds NaN"),
    "inf scale": (lambda d: _nan_scale(d, np.inf), "fp8-to-bf16", f"tensor '{O_PROJ}_scale_inv': weight_scale_inv holds NaN or infinity"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_and_status_1(src, tmp_path, case):
    edit, mode, expected = BAD[case]
    inp = copy_folder(src, tmp_path / "in")
    edit(inp)
    line = one_line(cli(mode, inp, tmp_path / "out", "--quiet", timeout=120))
    assert line.startswith(f"dsv3-convert: error: {inp}") and expected in line, line
    assert not (tmp_path / "out").exists()


def test_a_full_disk_gives_one_line_and_a_resumable_folder(src, ref, tmp_path):
    out = tmp_path / "out"
    limit = 16 << 10  # bytes per file (`ulimit -f`): the manifest fits, the first shard does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    line = one_line(cli("hf-to-ms", src, out, "--dtype", "bf16", "--quiet", preexec_fn=small_files))
    assert "safetensors: cannot write: File too large" in line, line
    assert not manifest_of(out)["complete"] and not [n for n in os.listdir(out) if n.endswith(".tmp")]
    transform.convert("hf-to-ms", src, out, dtype="bf16", progress=False)
    assert digest(out) == ref


# ----------------------------------------------------------------------------- 7. silently accepted nonsense
def test_fp8_to_bf16_of_a_folder_without_fp8_is_refused(fp8_state, tmp_path):
    config, _ = fp8_state
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    inp = save_folder(tmp_path / "bf16", plain, hf.random_hf_state_dict(hf.tiny_hf_config(), seed=4))
    line = one_line(cli("fp8-to-bf16", inp, tmp_path / "out", "--quiet"))
    assert f"{inp}: no FP8 (F8_E4M3) weights here" in line and not (tmp_path / "out").exists()


def test_resume_rewrites_a_finished_file_whose_digest_differs(src, ref, tmp_path):
    out = tmp_path / "out"
    transform.convert("hf-to-ms", src, out, dtype="bf16", progress=False)
    victim = out / "model-00003-of-00006.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, another sha256
    victim.write_bytes(bytes(data))
    summary = transform.convert("hf-to-ms", src, out, dtype="bf16", progress=False)
    assert summary["resumed_files"] == summary["files"] - 1
    assert digest(out) == ref
