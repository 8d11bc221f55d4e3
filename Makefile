# The two commands of the README: `make ablations` (the main job) and `make test`. Both set themselves up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
COMMITTED := results/ablations/$(PROFILE)
# A fresh folder per run (ignored by git): the committed run in $(COMMITTED) is compared with, never overwritten.
OUT ?= $(COMMITTED)-$(shell date -u +%Y%m%dT%H%M%SZ)
STAMP := $(VENV)/.installed

.PHONY: setup data fit test test-slow ablations report bench clean

# torch is pinned to the CPU wheel on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,latents]" "torch==2.13.0"
	touch $(STAMP)

setup: $(STAMP)

# The embedded dataset: Debian's dataset-fashion-mnist (root only; otherwise the loader says what to do).
data:
	@test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; } || true

fit: setup data
	$(PY) -m lit_mpdit fit --config configs/fmnist.yaml

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# Trains the grid into $(OUT), one progress line per cell, and ends with a reproduction report against the committed run.
ablations: setup data
	$(PY) -m ablations.sweep --profile $(PROFILE) --out $(OUT) $(if $(wildcard $(COMMITTED)/fid_table.csv),--compare $(COMMITTED))

# Rebuilds the tables, plots and claims of every committed sweep in seconds (no training), and points their
# MLflow stores at this clone's artifacts.
report: setup
	@for d in $(patsubst %/sweep_run.json,%,$(wildcard results/ablations/*/sweep_run.json)); do \
	  case $$d in *-20*) continue;; esac; $(PY) -m ablations.report $$d || exit 1; done

# DIT=<a checkout of facebookresearch/DiT> adds the reference's training step beside this suite's.
bench: setup data
	$(PY) benchmarks/run.py
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_compile.py
	$(if $(DIT),$(PY) benchmarks/bench_reference.py --dit $(DIT))

clean:
	rm -rf $(VENV) results/runs results/cache
