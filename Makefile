# forkchat: every target sets up .venv first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NAME   ?= client
PORT   ?= 33016
ARGS   ?=

.PHONY: all run client pids bench test lint format clean

all: test

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

run: $(STAMP)
	$(BIN)/python bin/server --port $(PORT) $(ARGS)

client: $(STAMP)
	$(BIN)/python bin/client $(NAME) --port $(PORT) $(ARGS)

pids: $(STAMP)
	$(BIN)/python bin/pids --port $(PORT) $(ARGS)

bench: $(STAMP)
	$(BIN)/python bin/bench --json bench.json $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	env -u PYTHONUNBUFFERED $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache bench.json
