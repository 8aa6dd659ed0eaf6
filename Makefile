# saesweep: `make install` once, then `make sweep` (the quick start), `make test`.
# `make train` runs `python train.py $(ARGS)` on the config's defaults (Pythia-70M-deduped and Pile-10k from
# the Hugging Face hub: it needs the network); `make train-offline` runs it on the reference folder.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
export WANDB_MODE ?= offline

# A reference folder: model/ (a local Hugging Face model directory) and corpus/train.jsonl.gz (the text).
REFERENCE ?= ../shared/reference
OFFLINE_ARGS = model.path=$(REFERENCE)/model data=jsonl data.path=$(REFERENCE)/corpus/train.jsonl.gz

# Targets that read only the reference folder never ask the hub for anything.
train-offline reproduce bench bench-gpu test test-slow test-interop test-browser: export HF_HUB_OFFLINE = 1

.PHONY: install train train-offline sweep reproduce evaluate report test test-slow test-interop test-browser lint clean cache-info bench bench-gpu device-wheels

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# torch is installed first from the pin in constraints.txt (a CPU wheel in this workplace). TORCH=skip keeps
# the torch already in the venv (a GPU build you installed: `$(VENV)/bin/pip install torch --index-url ...`)
# and installs the rest without the pin.
TORCH ?= pin
install: $(VENV)/bin/python
	$(PYTHON) -m pip install -q --upgrade pip
ifeq ($(TORCH),skip)
	@$(PYTHON) -c 'import torch; print("keeping torch", torch.__version__)' 2>/dev/null || \
		{ echo "error: TORCH=skip keeps the torch in $(VENV), but it has none: install your torch build into it first" >&2; exit 1; }
	$(PYTHON) -m pip install -q -e ".[dev,slurm,optuna]"
else
	$(PYTHON) -m pip install -q -c constraints.txt torch
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev,slurm,optuna]"
endif

train:
	$(PYTHON) train.py $(ARGS)

# The whole flow offline, on the small reference model and corpus beside the repo.
train-offline:
	$(PYTHON) train.py $(OFFLINE_ARGS) n_tokens=200000 $(ARGS)

# The quick start (conf/experiment/quickstart.yaml): ReLU/L1 dictionaries of 1, 2, 4, 8 × d_model, three
# passes over 200k tokens in one ensemble, then the evaluation and one table: features found again in the
# next larger dictionary, beside chance, and fidelity, by size (about two minutes on 2 CPU cores).
# src/saesweep/quickstart.py picks the data: the reference folder (REFERENCE=DIR) offline when there is
# one, else Pythia-70M-deduped and Pile-10k from the hub, else it stops with one line saying both ways.
sweep:
	$(PYTHON) -m saesweep.quickstart --reference $(REFERENCE) $(if $(filter file,$(origin REFERENCE)),,--explicit-reference) $(ARGS)

# The seed experiment on the reference model (conf/experiment/seed_reference.yaml: dict_ratio 1,2,4,8 ×
# seeds 0,1), its evaluation, and REPRODUCTION.md with its figures in the sweep directory; UPDATE_DOCS=1
# also regenerates the tracked REPRODUCTION.md and docs/reproduction/ from it.
REPRODUCE_SWEEP := multirun/seed_reference/$(shell date +%Y-%m-%d_%H-%M-%S)
REPRODUCE_COMMAND := make reproduce   \# = python train.py experiment=seed_reference -m, python evaluate.py sweep_dir=..., python -m saesweep.reproduction ...
reproduce:
	$(PYTHON) train.py experiment=seed_reference $(OFFLINE_ARGS) hydra.sweep.dir=$(REPRODUCE_SWEEP) -m $(ARGS)
	$(PYTHON) evaluate.py sweep_dir=$(REPRODUCE_SWEEP)
	$(PYTHON) -m saesweep.reproduction $(REPRODUCE_SWEEP) --out $(REPRODUCE_SWEEP)/REPRODUCTION.md --command "$(REPRODUCE_COMMAND)"
ifeq ($(UPDATE_DOCS),1)
	$(PYTHON) -m saesweep.reproduction $(REPRODUCE_SWEEP) --command "$(REPRODUCE_COMMAND)"
endif

# MCS between the runs of a sweep, summary table, plots, W&B evaluation run: make evaluate SWEEP=multirun/<date>/<time>
evaluate:
	$(PYTHON) evaluate.py sweep_dir=$(SWEEP)

# Feature report of one run: make report RUN=multirun/<date>/<time>/0 [ARGS='report.features=[12,345]']
report:
	$(PYTHON) report.py run_dir=$(RUN) $(ARGS)

# Benchmarks print measured figures and a RESULT line; they assert nothing. The SAELens comparisons need
# `$(PYTHON) -m pip install -c constraints.txt -e '.[bench]'` (it moves transformer-lens to 3.9, which saesweep supports).
bench:
	$(PYTHON) benchmarks/harvest.py
	$(PYTHON) benchmarks/stream.py
	$(PYTHON) benchmarks/mcs.py
	$(PYTHON) benchmarks/similarity.py
	$(PYTHON) benchmarks/synthetic_generator.py
	$(PYTHON) benchmarks/report.py
	$(PYTHON) benchmarks/bench_train.py
	$(PYTHON) benchmarks/host_step.py
	$(PYTHON) benchmarks/bench_sweep.py

# On a machine with a GPU, the project and the `bench` extra installed (no network needed): saesweep
# against SAELens per dictionary and for a 4-ratio ensemble, FLOP/s against the measured matmul peak.
bench-gpu:
	$(PYTHON) benchmarks/gpu.py

# .wheels-gpu/ for benchmarks/device/run.sh: #24's GPU checks in one call of the device tool, whose machine
# reaches no package registry
device-wheels:
	PYTHON=$(PYTHON) bash benchmarks/device/wheels.sh

test:
	$(PYTHON) -m pytest -q -m "not browser and not slow and not interop" tests

# Multi-process runs that take minutes (DDP resume after a kill, submitit, Optuna); CI runs them too.
test-slow:
	$(PYTHON) -m pytest -q -m "slow and not browser and not interop" tests

# Interoperability with the real SAELens, sparsify and dictionary_learning: a second venv, since SAELens pins
# transformer-lens<4. dictionary_learning's dependencies pull PyPI's torchvision, which does not import beside
# the pinned torch and breaks transformers' imports; nothing tested needs it, so it is removed.
INTEROP_VENV ?= .venv-interop
test-interop:
	test -x $(INTEROP_VENV)/bin/python || python3 -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install -q -c constraints.txt torch
	$(INTEROP_VENV)/bin/python -m pip install -q -c constraints.txt -e ".[dev,interop]"
	$(INTEROP_VENV)/bin/python -m pip uninstall -y -q torchvision
	$(INTEROP_VENV)/bin/python -m pytest -q -m interop tests

# Report pages in real headless Chromium (Debian: apt-get install -y chromium); fails if it is missing.
test-browser:
	REQUIRE_BROWSER=1 $(PYTHON) -m pytest -q -m browser tests

# Activation stores in the cache: size, tokens, key. `$(VENV)/bin/saesweep-store rm NAME` deletes one.
cache-info:
	$(VENV)/bin/saesweep-store ls

lint:
	$(PYTHON) -m ruff check src tests benchmarks train.py evaluate.py report.py steer.py

# Caches and build files only. Results (multirun/, outputs/) are yours: delete a sweep with rm -r; the
# activation store is listed by `make cache-info` and deleted with saesweep-store rm.
clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis build dist src/*.egg-info
	find . -path ./$(VENV) -prune -o -path ./$(INTEROP_VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
