"""Docs stay complete: every DeepseekV3Config key and every upstream alias is documented in English and Chinese."""
import os
import re

import pytest

from mindformers_dsv3 import config as config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_config_key_is_documented(lang):
    with open(os.path.join(ROOT, "docs", lang, "config.md"), encoding="utf-8") as fh:
        text = fh.read()
    documented = {word for code in re.findall(r"`([^`]+)`", text) for word in re.findall(r"[A-Za-z_]+", code)}
    keys = set(config_module._FIELDS) | set(config_module._ALIASES)
    missing = sorted(keys - documented)
    assert not missing, f"docs/{lang}/config.md does not document: {missing}"


@pytest.mark.parametrize("name", ["README.md", "README.zh.md"])
def test_readme_links_resolve(name):
    path = os.path.join(ROOT, name)
    with open(path, encoding="utf-8") as fh:
        links = re.findall(r"\]\(([^)#]+)\)", fh.read())
    broken = [link for link in links if "://" not in link and not os.path.exists(os.path.join(ROOT, link))]
    assert not broken, f"{name} links to missing files: {broken}"
