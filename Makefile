# Two commands for a fresh machine: `make demo` and `make test`. Both build .venv when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test lint clean gpu-report

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m repvgg_tools.cli.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# GPU proof in one command (no venv needed: a GPU machine may have torch and no package index; python3 is used
# when .venv is absent). Writes gpu_report/report.{md,json,png}; see docs/benchmark.md.
gpu-report:
	PYTHONPATH=. $(if $(wildcard $(PY)),$(PY),$(PYTHON)) tools/gpu_report.py --out gpu_report --budget-s 300

lint: $(STAMP)
	$(PY) -m ruff check repvgg_tools tests tools

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_out
