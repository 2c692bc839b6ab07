"""Where the plugin's data folders are: `register/` (the REGISTER_PATH folder), `configs/` (the shipped
YAMLs and the tiny model's tokenizer).

In a source checkout they sit beside the package (`<repo>/register`, `<repo>/configs`); a wheel carries
them inside the package (`mindformers_dsv3/register`, `mindformers_dsv3/configs`, mapped in setup.cfg).
`python -m mindformers_dsv3 paths` prints both.
"""
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def data_root():
    """The folder holding `register/` and `configs/`: the package itself (wheel), else its parent (source tree)."""
    if os.path.isdir(os.path.join(PACKAGE_DIR, "register")):
        return PACKAGE_DIR
    return os.path.dirname(PACKAGE_DIR)


def register_dir():
    """The folder to pass as `--register_path` / `REGISTER_PATH`."""
    return os.path.join(data_root(), "register")


def configs_dir():
    """The shipped YAMLs (`tiny/`, `deepseek3_671b/`, `deepseek_r1_671b/`)."""
    return os.path.join(data_root(), "configs")


def find_data_file(path):
    """`path` as given when it exists (absolute, or relative to the working directory); else a relative
    path taken from the plugin's data root (`configs/tiny/...` from a wheel install); else `path` as given."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(data_root(), path)
    return candidate if os.path.exists(candidate) else path
