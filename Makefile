# Every target works on a fresh machine by itself: it creates the virtual
# environment when it is missing or when the dependency list changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The stamp names the dependency list and this checkout, so a venv shared
# between clones (CI) re-links the editable install to the current tree.
STAMP  := $(VENV)/.deps-$(shell (cat setup.cfg pyproject.toml; echo $(CURDIR)) | sha256sum | cut -c1-16)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip check
	@rm -f $(VENV)/.deps-*
	@touch $@

demo: setup
	$(PY) -m mindformers_dsv3.demo

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/decode.py
	$(PY) bench/moe_scaling.py
	$(PY) bench/train.py
	$(PY) bench/convert.py
	$(PY) bench/load.py
	$(PY) bench/quant.py
	$(PY) bench/mtp.py

clean:
	rm -rf $(VENV) output modules kernel_meta .pytest_cache
