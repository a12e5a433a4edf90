# Fresh machine: `make demo` or `make test`. Each creates .venv and installs the project into it.
# TORCH pins the local CPU wheel so a dev box or CI never downloads the multi-GB CUDA build; GPU hosts use their
# image's torch (see scripts/gpu_check.sh).
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
DEMO    ?= demo
PYTEST_ARGS ?=
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export TRITON_CACHE_DIR ?= $(CURDIR)/.cache/triton
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv test demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: venv
	$(PY) -m pytest -m "not gpu" -q $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/dsv3c init-random --config tiny --out $(DEMO)/tiny --overwrite
	@echo "--- random weights: the text below is nonsense; it shows the whole path runs ---"
	$(VENV)/bin/dsv3c run --checkpoint $(DEMO)/tiny --eager --prompt "Tell me about the weather." \
		--max-new-tokens 24 --dtype float32 --stats

clean:
	rm -rf $(VENV) $(DEMO) .cache .pytest_cache *.egg-info
