# forkchat: every target sets up .venv first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NAME   ?= client
PORT   ?= 33016
ARGS   ?=

.PHONY: all run client pids bench test lint format clean sysdeps cert

all: test

.PHONY: help
help:
	@echo 'Targets (those that run Python set up .venv with the requirements first):'
	@echo '  run      the server, in the foreground    make run PORT=4000 ARGS="--requeue"'
	@echo '  client   a chat client                    make client NAME=bob ARGS="--cafile cert.pem"'
	@echo '  pids     list or signal its processes     make pids ARGS="--signal USR2"'
	@echo '  test     lint, then the whole suite (about 3 min; may apt-get haproxy, openssl, nc)'
	@echo '  bench    the benchmark beside its reference relay; figures also in bench.json'
	@echo '  lint     ruff check and format check      format: let ruff fix what it can'
	@echo '  cert     a self-signed cert.pem and key.pem, for trying TLS'
	@echo '  sysdeps  haproxy, openssl, nc if missing   clean: remove .venv and the caches'

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
	$(BIN)/python bin/bench --ref --json bench.json $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint sysdeps
	env -u PYTHONUNBUFFERED $(BIN)/python -m pytest

# System packages the tests use: haproxy (run in the foreground by the tests), the
# openssl CLI (test certificates, a third-party TLS client) and nc (a program that is
# not a forkchat client, for bin/pids). Installed only when missing, and only as root;
# otherwise the tests that need them are skipped. Each is command:package.
sysdeps:
	@missing=""; \
	for need in haproxy:haproxy openssl:openssl nc:netcat-openbsd; do \
		command -v $${need%%:*} >/dev/null || missing="$$missing $${need#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "sysdeps: missing$$missing; install it (Debian: apt-get install$$missing)," \
			"the tests that need it are skipped"; exit 0; fi; \
	echo "sysdeps: installing$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq && apt-get install -y -qq --no-install-recommends$$missing >/dev/null

# A self-signed pair for trying TLS by hand: make run ARGS="--tls-cert cert.pem --tls-key key.pem"
cert: cert.pem

cert.pem:
	@openssl req -x509 -newkey rsa:2048 -nodes -days 30 -keyout key.pem -out cert.pem \
		-subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost 2>/dev/null \
		|| { echo "cert: openssl failed (is the openssl CLI installed? make sysdeps)"; exit 1; }
	@echo "wrote cert.pem and key.pem: self-signed for localhost and 127.0.0.1, 30 days"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache bench.json
