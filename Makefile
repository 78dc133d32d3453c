# Two entry points for a fresh machine: `make demo` (the main job on the embedded default) and `make test`.
# Both create or reuse a virtual environment at .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_DIR ?= demo-output

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so that nothing pulls a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.demo --out $(DEMO_DIR)

test: $(STAMP)
	scripts/install_test_browser.sh
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/method.py --repeat 5
	$(PY) bench/caching_job.py
	$(PY) bench/generation_job.py
	$(PY) bench/training.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
