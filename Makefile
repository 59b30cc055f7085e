# Quickstart: `make demo` then `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint notebooks benchmarks shipped clean

$(STAMP): setup.cfg pyproject.toml .ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of PyTorch that lies on disk; never an unpinned torch (that pulls CUDA).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c .ci/constraints.txt -e ".[tests,training,notebooks]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Train on the built-in digits with the default settings, then sample with DDPM (1000 steps) and DDIM (50, 10 steps):
# grids, a comparison image and the evaluation metrics land in demo_output/.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 \
		--mixed_precision no --dynamo_backend no training/train_unconditional.py \
		--output_dir demo_output/model --overwrite_output_dir
	HF_HUB_OFFLINE=1 $(PY) training/demo.py --model demo_output/model --output_dir demo_output

# Re-execute every tutorial notebook at full size and refresh the committed .ipynb outputs.
notebooks: $(STAMP)
	$(PY) notebooks/run_notebooks.py --write

# Regenerate the code inside the shipped pipeline folders (training/pretrained/*/) from the library; `make test`
# checks it with --check. Weights, configs, model cards, metrics and samples are training outputs and stay as they are.
shipped: $(STAMP)
	$(PY) training/export_shipped.py

benchmarks: $(STAMP)
	$(PY) benchmarks/bench_schedulers.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
