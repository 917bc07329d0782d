# transformer_mt — every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: setup data prepare train evaluate bench bench-decode bench-int8 bench-prepare bench-serve bench-variants test lint clean
CKPT   ?= runs/multi30k_en-de/default/checkpoints/final.pt

setup: $(STAMP)

# torch goes in first, pinned: an unpinned torch would pull a multi-GB CUDA build. A CUDA
# build of torch 2.4 or newer already in .venv (installed by hand) is kept, unless TORCH is
# given. Where PyPI's wheel is the CUDA build,
# TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
KEEP_TORCH := $(BIN)/python -c "import sys, torch; \
	sys.exit(torch.version.cuda is None or tuple(map(int, torch.__version__.split('.')[:2])) < (2, 4))"
ifneq ($(origin TORCH),file)
KEEP_TORCH := false
endif
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(KEEP_TORCH) 2>/dev/null || $(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

data: setup  ## Multi30k raw files into data/raw/multi30k (from ../shared, else downloaded)
	$(BIN)/python scripts/fetch_multi30k.py

prepare: data  ## tokenizer + encoded arrays (ARGS= Hydra overrides)
	$(BIN)/tmt-prepare $(ARGS)

train: prepare  ## the default recipe: Multi30k en->de (ARGS= Hydra overrides)
	$(BIN)/tmt-train $(ARGS)

evaluate: setup  ## [CKPT=path/to/final.pt] [ARGS="--split test"]
	$(BIN)/tmt-evaluate $(CKPT) $(ARGS)

bench: data  ## training throughput: ours vs a plain nn.Transformer loop (ARGS=--json)
	$(BIN)/python scripts/bench_train.py $(ARGS)

bench-variants: data  ## training tokens/s of each model.* variant against the default model (ARGS=--json)
	$(BIN)/python scripts/bench_variants.py $(ARGS)

bench-decode: setup  ## decoding speed on test_2016_flickr of CKPT (default: make train's final.pt)
	$(BIN)/python scripts/bench_decode.py --checkpoint $(CKPT) $(ARGS)

bench-int8: setup  ## CTranslate2 int8 against fp32 at several model widths (CKPT: its vocabulary)
	$(BIN)/python scripts/bench_int8.py --checkpoint $(CKPT) $(ARGS)

bench-serve: setup  ## tmt-serve under 1/8/32 concurrent clients and 1,000 malformed requests (CKPT=final.pt)
	$(BIN)/python scripts/bench_serve.py --checkpoint $(CKPT) $(ARGS)

bench-prepare: data  ## preparation speed and memory at 100k/1M/4M pairs vs bare SentencePiece (ARGS=--json)
	$(BIN)/python scripts/bench_prepare.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) data/prepared data/bench_prepare .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
