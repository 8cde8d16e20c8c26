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

.DEFAULT_GOAL := help
.PHONY: help install world world-check bench test test-slow lint clean

help: ## Show this help
	@awk 'BEGIN{FS=":.*## "} /^[a-zA-Z_-]+:.*## /{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: ## Create .venv and install the project with its dev extras (torch 2.14.1 + torchvision 0.29.1 pinned)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]" "torch==2.14.1" "torchvision==0.29.1"

world: ## Rebuild the Shapes world (PART=all|vae|detector|base|gold [CONCEPT=star]); resumes from checkpoints
	$(PY) -m bench.world build --part $(PART) $(if $(filter gold,$(PART)),--concept $(CONCEPT)) $(ARGS)

world-check: ## Print the Shapes world's fidelity table from the shipped files
	$(PY) -m bench.world check $(ARGS)

bench: ## Run one benchmark job: make bench METHOD=esd CONCEPT=star EVAL=quick [ARGS="key=value ..."]
	$(PY) -m bench method=$(METHOD) concept=$(CONCEPT) eval=$(EVAL) model=$(MODEL) $(ARGS)

test: ## Run the fast test suite
	$(PY) -m pytest -q

test-slow: ## Run the slow end-to-end tests
	$(PY) -m pytest -q -m slow

lint: ## Lint with ruff
	$(VENV)/bin/ruff check bench methods leaderboard tests

clean: ## Remove runs, caches and wandb output (keeps the shipped world)
	rm -rf runs .cache wandb outputs multirun
