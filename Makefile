# opsrelay: `make demo` shows the main job, `make test` runs every check.
# Both set up what they need (virtualenv, RabbitMQ for the tests) idempotently.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv test lint typecheck pytest rabbitmq rabbitmq-cluster rabbitmq-tls mail-clients test-users demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# pyproject's package-dir makes the editable install a plain .pth entry (no import hook)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

rabbitmq:
	scripts/ensure-rabbitmq.sh

# Three more nodes, clustered, on 5681-5683 (the fleet tests kill one).
rabbitmq-cluster: rabbitmq
	scripts/ensure-rabbitmq-cluster.sh

# One more node with TLS (5691) and x509 login, and its test certificates.
rabbitmq-tls: rabbitmq
	scripts/ensure-rabbitmq-tls.sh

# Real mail clients the sendmail tests drive (bsd-mailx, git send-email, msmtp, ssmtp).
mail-clients:
	scripts/ensure-mail-clients.sh

# Unprivileged users for the maildrop tests (opsrelay-t1..t4); needs root, like the installs above.
test-users:
	scripts/ensure-test-users.sh

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

pytest: venv rabbitmq rabbitmq-cluster rabbitmq-tls mail-clients test-users
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

demo: venv
	$(BIN)/python scripts/demo.py

bench: venv rabbitmq
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
