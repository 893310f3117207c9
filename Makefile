# The two commands of the README: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# pip takes this exact torch as a CPU build from local disk on the project's machines;
# an unpinned torch (or one pulled in by monai) would fetch a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= qcloop-demo

.PHONY: demo test lint setup clean

setup: $(VENV)/.installed

# Every extra (.[all]) and the outside example plugin (examples/qcloop-tent: its tests and the
# TENT demo option need it installed); tests/test_base_install.py checks the base install alone.
$(VENV)/.installed: pyproject.toml examples/qcloop-tent/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[all,dev]"
	# nnU-Net v2 model cards (heavy, not in `all`); naming torch keeps pip from upgrading it
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[nnunet]"
	$(BIN)/pip install --quiet -e examples/qcloop-tent
	touch $@

demo: setup
	$(BIN)/qcloop demo --out $(DEMO_OUT)

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
