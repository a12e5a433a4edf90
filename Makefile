# Fresh machine: `make demo` or `make test`. Each creates .venv and installs the project into it.
# TORCH pins the local CPU wheel so a dev box or CI never downloads the multi-GB CUDA build; GPU hosts use their
# image's torch (see scripts/gpu_check.sh).
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
DEMO    ?= demo
PYTEST_ARGS ?=
# CI has 2 cores: two pytest workers, each test file on one worker (a file's session fixtures, e.g. compiled
# artifacts, are built once); the suite takes ~13 min in one process on that machine, the limit is 15.
PYTEST_WORKERS ?= 2
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

# TORCHINDUCTOR_COMPILE_THREADS=1 (test, demo): Inductor compiles in the process instead of starting a pool of
# compile workers (each importing torch) in every process that compiles; a CPU build gains nothing from the pool on 2
# cores: a tiny build of 4 graphs 101.7 -> 87.0 s wall (91.7 -> 81.2 s user) on an idle machine, 2026-11-26.
test: venv
	TORCHINDUCTOR_COMPILE_THREADS=1 $(PY) -m pytest -m "not gpu" -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/dsv3c init-random --config tiny --out $(DEMO)/ckpt-tiny --overwrite
	TORCHINDUCTOR_COMPILE_THREADS=1 $(VENV)/bin/dsv3c compile --config $(DEMO)/ckpt-tiny --device cpu \
		--out $(DEMO)/art-tiny --max-batch-size 2 \
		--max-seq-len 256 --batch-sizes 1,2 --prefill-chunk 64 --dtype float32 --overwrite
	$(VENV)/bin/dsv3c inspect $(DEMO)/art-tiny
	@echo "--- random weights: the chat answer below is nonsense; it shows the whole path runs ---"
	$(VENV)/bin/dsv3c run --artifacts $(DEMO)/art-tiny --checkpoint $(DEMO)/ckpt-tiny --chat \
		--prompt "Tell me about the weather." --max-new-tokens 24 --stats

clean:
	rm -rf $(VENV) $(DEMO) .cache .pytest_cache *.egg-info
