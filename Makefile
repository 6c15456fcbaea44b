# balloon-hints — every set-up step lives here, so a fresh clone needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help venv install test test-fast bench lint demo stack rules ui-vendor chaos attacks-long system-deps deploy-test container-test vm-deps vm-test vm-demo clean

help:
	@echo "make demo        run one host and three simulated guests with live metrics (DEMO_SECONDS=N to stop;"
	@echo "                 DEMO_POLICY=balance|mom: automatic balloon sizing under DEMO_BUDGET=384MiB)"
	@echo "make test        install what the tests need and run them (~9 min on 2 cores; as root it"
	@echo "                 apt-installs Chromium and Prometheus, and QEMU for the real-VM smoke test)"
	@echo "make bench       run the benchmark suite and rewrite docs/PERFORMANCE.md"
	@echo "make stack       the demo's host and guests plus a real Prometheus with deploy/'s rules (STACK_SECONDS=N)"
	@echo "make rules       deploy/'s alert rules with your runbook base: RUNBOOK_BASE=https://... (to build/prometheus)"
	@echo "make chaos       long crash test: host and guests killed at random, no page may be lost"
	@echo "make attacks-long the attack suite (tests/attacks) with 5 minutes of fuzzing (ATTACK_FUZZ_SECONDS=N)"
	@echo "                 and 100 rounds of guests coming and going for the host's memory (ATTACK_MEMORY_ROUNDS=N)"
	@echo "make lint        ruff"
	@echo "make deploy-test slower checks of deploy/ (real Prometheus, schemas)"
	@echo "make container-test build and run the image with podman"
	@echo "make vm-test     the real-VM suite: QEMU (TCG) guests running the agent, RAM files punched (root)"
	@echo "make vm-demo     boot a real guest, run the agent in it, inflate and deflate it live (root)"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[host,tools,test,plot,dev]'
	@touch $(STAMP)

venv install: $(STAMP)

# Debian packages the tests use (promtool/prometheus; chromium for the /ui browser test).
# Installed only when missing and only where apt-get can run as root (CI, fresh machines);
# elsewhere the dependent tests skip loudly.
SYSTEM_DEPS := prometheus:promtool prometheus:prometheus chromium:chromium
system-deps:
	@missing=""; for pair in $(SYSTEM_DEPS); do command -v $${pair#*:} >/dev/null 2>&1 || \
	  case " $$missing " in *" $${pair%%:*} "*) ;; *) missing="$$missing $${pair%%:*}";; esac; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing$$missing and cannot apt-get install it: the tests that need it will skip"; fi; \
	fi

# -rs: every skipped test says why (no Chromium, not root, no QEMU ...) at the end of the run.
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check shared guest_agent host_daemon balloonctl tests bench deploy

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

demo: $(STAMP)
	$(BIN)/python -m guest_agent.demo

# The /ui dashboard's chart library, vendored from npm (host_daemon/ui/static/vendor/VENDOR.md).
UPLOT_VERSION ?= 1.6.32
UI_VENDOR := host_daemon/ui/static/vendor
ui-vendor:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cd "$$tmp" && npm pack --silent uplot@$(UPLOT_VERSION) >/dev/null && \
	  tar xzf uplot-$(UPLOT_VERSION).tgz && cd - >/dev/null && \
	  cp "$$tmp/package/dist/uPlot.iife.min.js" "$$tmp/package/dist/uPlot.min.css" $(UI_VENDOR)/ && \
	  cp "$$tmp/package/LICENSE" $(UI_VENDOR)/uPlot.LICENSE && cd $(UI_VENDOR) && sha256sum uPlot.*

# The runbook base the shipped rules link to; `make rules` swaps it for RUNBOOK_BASE.
RUNBOOK_BASE_SHIPPED := https://github.com/balloon-hints/balloon-hints/blob/main/docs/OPERATIONS.md
rules:
	@case "$(RUNBOOK_BASE)" in http://*|https://*) ;; \
	  *) echo "make rules: give RUNBOOK_BASE=https://... (the absolute URL of your copy of docs/OPERATIONS.md)"; exit 2;; esac
	@mkdir -p build/prometheus
	@for f in balloon-rules.yml balloon-rules-test.yml; do \
	  sed 's|$(RUNBOOK_BASE_SHIPPED)#|$(RUNBOOK_BASE)#|' deploy/prometheus/$$f > build/prometheus/$$f; done
	@echo "wrote build/prometheus/balloon-rules.yml (runbooks at $(RUNBOOK_BASE)#...) and its promtool tests"

# The demo plus a real Prometheus (Debian's package, installed when missing) with deploy/'s
# config and rules; no containers. STACK_SECONDS=N stops it by itself. See docs/OPERATIONS.md.
stack: $(STAMP)
	@$(MAKE) -s system-deps SYSTEM_DEPS=prometheus:prometheus
	$(BIN)/python deploy/stack.py

# tests/attacks with 5 minutes of structured fuzzing (make test runs it with 12 s) and 100 rounds of
# 60 guests at the open-mode cap coming and going (make test: 3). See docs/OPERATIONS.md.
attacks-long: $(STAMP)
	BALLOON_ATTACK_FUZZ_SECONDS=$${ATTACK_FUZZ_SECONDS:-300} BALLOON_ATTACK_MEMORY_ROUNDS=$${ATTACK_MEMORY_ROUNDS:-100} \
	  $(BIN)/python -m pytest -q -rs -p no:cacheprovider tests/attacks $(PYTEST_ARGS)

chaos: $(STAMP)
	$(BIN)/python -m tests.chaos --crashes $${CHAOS_CRASHES:-20}

# tests/deploy with every tool required (a missing promtool/prometheus/npm/systemd-analyze fails
# instead of skipping) and a longer live Prometheus run. See docs/OPERATIONS.md.
DEPLOY_TOOLS := prometheus:promtool systemd:systemd-analyze npm:npm
deploy-test: $(STAMP) system-deps
	@missing=""; for pair in $(DEPLOY_TOOLS); do command -v $${pair#*:} >/dev/null 2>&1 || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then echo "installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi
	BALLOON_DEPLOY_STRICT=1 BALLOON_LIVE_SCRAPES=$${BALLOON_LIVE_SCRAPES:-20} \
	  $(BIN)/python -m pytest -q -rs -p no:cacheprovider tests/deploy $(PYTEST_ARGS)

# Build deploy/Dockerfile with podman (runc, deploy/podman/containers.conf) on a debootstrapped
# base, run a host and a guest container, scrape them. Root only; installs its tools first.
CONTAINER_TOOLS := podman runc debootstrap
container-test: $(STAMP)
	@[ "$$(id -u)" = 0 ] || { echo "container-test needs root (rootful podman, debootstrap)"; exit 1; }
	@missing=""; for t in $(CONTAINER_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CONTAINER_TOOLS) ca-certificates >/dev/null; fi
	$(BIN)/pip install --quiet -e '.[container]'
	CONTAINERS_CONF=$(CURDIR)/deploy/podman/containers.conf BALLOON_CONTAINER_TEST=1 BALLOON_DEPLOY_STRICT=1 \
	  $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/deploy/test_container.py $(PYTEST_ARGS)

# Real Linux guests under QEMU (docs/OPERATIONS.md "Real VMs"): QEMU + busybox from apt and
# Debian's kernel from its .deb, cached in $${BALLOON_VM_CACHE:-/var/cache/balloon-vm}.
vm-deps: $(STAMP)
	$(BIN)/python -m tests.vm.harness

vm-test: vm-deps
	BALLOON_VM_FULL=1 $(BIN)/python -m pytest -q -rs -p no:cacheprovider tests/vm $(PYTEST_ARGS)

vm-demo: vm-deps
	$(BIN)/python -m tests.vm.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
