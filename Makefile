# Two commands on a fresh machine: `make demo` and `make test`. Both install first when needed.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast lint lint-benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

# TEST_WORKERS: pytest-xdist processes (default: one per CPU, at most 4); TEST_WORKERS=0 runs serially
TEST_WORKERS ?= auto --maxprocesses=4

test: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

test-fast: install
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q -m "not slow and not distributed"

# ruff (lint + format check) and mypy over the packages; the rule sets are in pyproject.toml
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(MAKE) -s lint-benchmarks

lint-benchmarks: install
	$(VENV)/bin/mypy $(BENCH_MYPY) benchmarks/

# benchmarks/ are scripts, run by hand: checked for what breaks them when the code they call changes
# (a missing or unexpected argument, an attribute or module that is gone), not for full typing
BENCH_MYPY := --follow-imports=silent --explicit-package-bases $(foreach c,union-attr arg-type assignment misc index operator return-value call-overload var-annotated,--disable-error-code=$(c))

clean:
	rm -rf bundles checkpoints logs outputs multirun
