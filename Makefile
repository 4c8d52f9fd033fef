# Two commands for a fresh machine: `make demo` (score the default model) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install gpu clean gpu-check

# The CPU ONNX Runtime by default; `make gpu` switches this environment to onnxruntime-gpu for good (the two
# wheels share one package directory, so exactly one of them may be installed; the choice is kept in ONNX_FILE
# so a later reinstall keeps it).
ONNX_FILE := $(VENV)/.onnx-extra
ONNX      := $(shell cat $(ONNX_FILE) 2>/dev/null || echo onnx)

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -c constraints.txt -e ".[dev,$(ONNX)]"
	touch $(STAMP)

install: $(STAMP)

gpu:
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	echo onnx-gpu > $(ONNX_FILE)
	$(BIN)/pip uninstall -y onnxruntime >/dev/null 2>&1 || true
	rm -f $(STAMP)
	$(MAKE) install

demo: $(STAMP)
	$(BIN)/micronet score

lint: $(STAMP)
	$(BIN)/ruff check micronet tests benchmarks
	$(BIN)/lint-imports

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

# The prepared CUDA check (issue 17): the machine's own python and packages, no install, no network, <= 6 min.
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
