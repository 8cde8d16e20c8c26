# ConcealBench — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

METHOD ?= esd
CONCEPT ?= star
EVAL ?= quick
MODEL ?= shapes
PART ?= all
ARGS ?=
RUNS ?=
RECORD ?=
SEEDS ?= 3
LAUNCHER ?=
SWEEP_DIR ?= multirun/sweep-$(METHOD)-$(CONCEPT)
SEARCH_DIR ?= multirun/search-$(METHOD)-$(CONCEPT)
REPLICATE_DIR ?= multirun/replicate-$(METHOD)-$(CONCEPT)

.DEFAULT_GOAL := help
.PHONY: help install world world-check throughput bench perf costs gpu-smoke sweep search replicate verify leaderboard publish leaderboard-png test test-slow lint clean

help: ## Show this help
	@awk 'BEGIN{FS=":.*## "} /^[a-zA-Z_-]+:.*## /{printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: ## Create .venv and install the project with its dev extras (torch 2.14.1 + torchvision 0.29.1 pinned, the rest under constraints.txt)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,sd]" "torch==2.14.1" "torchvision==0.29.1"

world: ## Rebuild the Shapes world (PART=all|vae|detector|base|gold [CONCEPT=star]); resumes from checkpoints
	$(PY) -m bench.world build --part $(PART) $(if $(and $(filter gold,$(PART)),$(filter command line,$(origin CONCEPT))),--concept $(CONCEPT)) $(ARGS)

world-check: ## Print the Shapes world's fidelity table from the shipped files
	$(PY) -m bench.world check $(ARGS)

bench: ## Run one benchmark job: make bench METHOD=esd CONCEPT=star EVAL=quick [ARGS="key=value ..."]
	$(PY) -m bench method=$(METHOD) concept=$(CONCEPT) eval=$(EVAL) model=$(MODEL) $(ARGS)

throughput: ## Benchmark the Shapes base model's generation speed (images/s, batch 64, CFG)
	$(PY) -m bench.world throughput $(ARGS)

costs: ## Price a job's probes from its config alone, e.g. make costs ARGS="model=sd14 concept=van_gogh probes=all"
	$(PY) -m bench.costs $(ARGS)

perf: ## Attack-engine benchmark: our snapshot engine vs the authors' naive loop (NFE, wall time)
	$(PY) -m bench.perf $(ARGS)

gpu-smoke: ## Every stage on a random-weight SD-v1.4-architecture pipeline: time, peak memory, paper_table estimate (ARGS="--tiny" on a CPU)
	$(PY) -m bench.gpu_smoke $(ARGS)

sweep: ## Hyperparameter sweep (Hydra multirun) + report: make sweep METHOD=uce [CONCEPT=star] [LAUNCHER=local|slurm]
	$(PY) -m bench -m +sweep=$(METHOD) concept=$(CONCEPT) eval=$(EVAL) model=$(MODEL) hydra.sweep.dir=$(SWEEP_DIR) \
		$(if $(LAUNCHER),hydra/launcher=$(LAUNCHER)) $(if $(filter local,$(LAUNCHER)),threads=1) $(ARGS)
	$(PY) -m bench.sweep_report $(SWEEP_DIR)

search: ## Optuna search (needs the optuna extra): make search METHOD=esd_x|uce [CONCEPT=star] [TRIALS=12]
	$(PY) -m bench -m +search=$(METHOD) concept=$(CONCEPT) eval=$(EVAL) model=$(MODEL) hydra.sweep.dir=$(SEARCH_DIR) \
		$(if $(TRIALS),hydra.sweeper.n_trials=$(TRIALS)) $(ARGS)
	$(PY) -m bench.sweep_report $(SEARCH_DIR)

replicate: ## The same job under several seeds + stability report: make replicate METHOD=esd CONCEPT=star [SEEDS=3]
	@$(PY) -m bench.replicate seeds "$(SEEDS)" > /dev/null
	$(PY) -m bench -m method=$(METHOD) concept=$(CONCEPT) eval=$(EVAL) model=$(MODEL) seed=$$($(PY) -m bench.replicate seeds "$(SEEDS)") \
		hydra.sweep.dir=$(REPLICATE_DIR) $(ARGS)
	$(PY) -m bench.replicate report $(REPLICATE_DIR)

verify: ## Rerun a record's job from its own config and compare: make verify RECORD=leaderboard/results/shapes/star/esd_x/<key> [ARGS="--against DIR"]
	@if [ -z "$(RECORD)" ]; then echo 'error: `RECORD` must name a record folder, e.g. make verify RECORD=leaderboard/results/shapes/star/esd_x/<key>' >&2; exit 2; fi
	$(PY) -m bench.verify "$(RECORD)" $(ARGS)

leaderboard: ## Preview the leaderboard with your runs beside the published ones: runs/leaderboard/site/index.html (changes no tracked file)
	$(PY) -m leaderboard build $(ARGS)

publish: ## Publish finished runs and rebuild the tracked site: make publish RUNS="runs/shapes/star/esd_x/<key> ..." (no RUNS: rebuild only)
	$(PY) -m leaderboard publish $(RUNS) $(ARGS)

leaderboard-png: ## Screenshot of the published page into docs/leaderboard.png (Debian's chromium)
	$(PY) -m leaderboard screenshot leaderboard/site/index.html docs/leaderboard.png

test: ## Run the fast test suite
	$(PY) -m pytest -q

test-slow: ## Run the slow end-to-end tests
	$(PY) -m pytest -q -m slow

lint: ## Lint with ruff
	$(VENV)/bin/ruff check bench methods leaderboard tests scripts

clean: ## Remove runs, caches and wandb output (keeps the shipped world)
	rm -rf runs .cache wandb outputs multirun
