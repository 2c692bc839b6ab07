"""The data files of the package travel in the wheel and are used from an install (issue 11 items 4-6).

A wheel is built from this tree and installed alone into a fresh venv (its dependencies come from this
venv's site-packages through a .pth line, so the editable install of the source tree stays invisible).
From there, in a folder outside the checkout: the C++ kernel source is compiled from the installed
`csrc/dsv3_cpu.cc`, the chat templates are the installed `templates/*.jinja`, and `make demo`'s module
trains and generates."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mindformers_dsv3")
DATA_FILES = ["csrc/dsv3_cpu.cc", "templates/deepseek_v3.jinja", "templates/deepseek_r1.jinja",
              "configs/tiny/finetune_deepseek3_tiny.yaml", "configs/tiny/synthetic_tokenizer/tokenizer.json"]


def test_setup_cfg_lists_every_package():
    """The wheel lists its packages explicitly (register/ and configs/ are mapped in): a new subpackage of
    mindformers_dsv3 must be added there, or the wheel silently lacks it."""
    import configparser
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    listed = set(parser["options"]["packages"].split())
    found = {os.path.relpath(folder, ROOT).replace(os.sep, ".") for folder, _, files in os.walk(PACKAGE)
             if "__pycache__" not in folder and any(f.endswith(".py") for f in files)}
    assert found <= listed, f"not in setup.cfg [options] packages: {sorted(found - listed)}"


def _source(name):
    if name.startswith("configs/"):
        return os.path.join(ROOT, name)
    return os.path.join(PACKAGE, name)


def test_wheel_carries_the_data_files_byte_for_byte(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in DATA_FILES:
            member = f"mindformers_dsv3/{name}"
            assert member in names, member
            with open(_source(name), "rb") as f:
                assert zf.read(member) == f.read(), member


_PROBE = r"""
import json, os, sys
import mindformers_dsv3
from mindformers_dsv3 import chat_templates, kernel_library
lib = kernel_library.cpu_kernel_library()
print("RESULT", json.dumps({"package": mindformers_dsv3.__file__, "source": kernel_library._SOURCE_FILE, "library": lib,
                  "templates": chat_templates._TEMPLATE_DIR,
                  "prompt": chat_templates.render_chat("r1", [{"role": "user", "content": "hi"}],
                                                       add_generation_prompt=True)}))
"""


def test_installed_package_compiles_its_kernels_and_renders_its_templates(installed, tmp_path):
    import json
    python, work, env = installed
    done = subprocess.run([python, "-c", _PROBE], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    venv = os.path.dirname(os.path.dirname(python))
    for key in ("package", "source", "templates"):
        assert got[key].startswith(venv), (key, got[key])   # the install, not the checkout
    assert got["library"] and got["library"].startswith(env["XDG_CACHE_HOME"]) and os.path.isfile(got["library"])
    assert got["prompt"] == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\n"


def test_demo_runs_from_the_installed_package(installed):
    """`python -m mindformers_dsv3.demo` (what `make demo` runs), from a folder outside the checkout."""
    python, work, env = installed
    done = subprocess.run([python, "-m", "mindformers_dsv3.demo"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    venv = os.path.dirname(os.path.dirname(python))
    assert f"Config: {venv}" in done.stdout and "OK: 3/3 continuations as expected" in done.stdout, done.stdout
