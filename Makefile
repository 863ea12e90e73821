# The two commands the README starts with: `make demo` and `make test`. Both work on a fresh
# machine: they create .venv, install ksup, fetch Apache Kafka's jars from Maven Central once
# (cached in ~/.cache/ksup) and start a throwaway broker on 127.0.0.1.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
COMPAT_VENV ?= .venv-compat
# The oldest confluent-kafka ksup supports; its consumer differs from 2.16's (see README).
COMPAT_CONFLUENT ?= 2.15.0

.PHONY: demo test test-cluster lint unit compat setup tools bench clean test-soak

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: tools $(VENV)/.installed

# Java 17+ and Maven run the local broker, systemd-analyze checks the unit files; install them
# from Debian's packages if missing.
tools:
	@command -v java >/dev/null && command -v mvn >/dev/null && command -v systemd-analyze >/dev/null || { \
	  echo "installing Java, Maven and systemd (apt-get)"; \
	  apt-get update -qq && apt-get install -y -qq default-jre-headless maven systemd >/dev/null; }
	@$(PYTHON) tests/localkafka.py fetch

demo: setup
	$(PY) examples/demo.py

lint: setup
	$(VENV)/bin/ruff check supervisor tests examples
	$(VENV)/bin/mypy supervisor
	$(VENV)/bin/mypy --strict examples/handler.py

test: lint
	$(PY) -m pytest
	$(MAKE) compat

# ksup verify soaks (issue 14): 100,000 messages, a fault every second, seeds 1-5 (~8 min).
test-soak: setup
	$(PY) -m pytest -m soak -s

# The cluster suite (tests/cluster/, marker `cluster`, not part of `make test`): a local 3-node
# cluster, Kafka's own consumer scenarios (OffsetValidationTest) with ksup as the consumer, a
# fleet rolled by examples/rolling-upgrade.sh, some scenarios again on Kafka 3.9. Needs Kafka's
# group tool (org.apache.kafka:kafka-tools) and the 3.9.2 jars, fetched once. Each scenario's
# figures go to bench-results/cluster.jsonl; the table the README shows is printed at the end.
# A part of it: make test-cluster CLUSTER_ARGS='-k classic' (any pytest arguments).
test-cluster: setup
	$(PY) tests/localkafka.py fetch 4.3.1 kafka-tools
	$(PY) tests/localkafka.py fetch 3.9.2
	mkdir -p bench-results && rm -f bench-results/cluster.jsonl
	$(PY) -m pytest -m cluster tests/cluster $(CLUSTER_ARGS); status=$$?; $(PY) -m tests.cluster.results; exit $$status

# The core no-loss tests again, on the oldest supported confluent-kafka.
compat: setup
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q -e '.[test]' 'confluent-kafka==$(COMPAT_CONFLUENT)'
	$(COMPAT_VENV)/bin/python -m pytest -m compat

# Benchmarks (not tests: figures, ratios against a baseline in the same run). Results and PNG
# figures go to bench-results/ (not committed); the README quotes them (figures in docs/).
# The peers run from virtual environments of their own: each pins its own confluent-kafka.
PEERS ?= .venv-peers
ARROYO_VERSION ?= 2.48.0
QUIX_VERSION ?= 3.28.1

$(PEERS)/arroyo/bin/python:
	$(PYTHON) -m venv $(PEERS)/arroyo
	$(PEERS)/arroyo/bin/python -m pip install -q 'sentry-arroyo==$(ARROYO_VERSION)' psutil

$(PEERS)/quix/bin/python:
	$(PYTHON) -m venv $(PEERS)/quix
	$(PEERS)/quix/bin/python -m pip install -q 'quixstreams==$(QUIX_VERSION)' psutil

bench: setup $(PEERS)/arroyo/bin/python $(PEERS)/quix/bin/python
	$(PY) -m pip install -q -e '.[test,bench]'
	mkdir -p bench-results
	$(PY) -m tests.bench.fairness --json bench-results/fairness.json
	$(PY) -m tests.bench.peers --json bench-results/peers.json \
	  --arroyo-python $(PEERS)/arroyo/bin/python --quix-python $(PEERS)/quix/bin/python
	$(PY) -m tests.bench.throughput --rounds 2 --json bench-results/throughput.json
	$(PY) -m tests.bench.drain --json bench-results/drain.json
	$(PY) -m tests.bench.reload --json bench-results/reload.json
	$(PY) -m tests.bench.plot --results bench-results

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(PEERS) .demo .pytest_cache .mypy_cache .ruff_cache
