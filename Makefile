# carbonscale: two entry points for a new user.
#   make lab    a real multi-host Graphite cluster in containers, deployed by site.yml
#   make test   everything CI runs: lint, unit tests, every molecule scenario
#               (each part's time printed at the end, and which part failed)
#   make test-quick   lint + unit tests only: the inner loop
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# Every scenario under molecule/ (the shared base in molecule/_shared is not one).
SCENARIOS ?= $(sort $(notdir $(patsubst %/molecule.yml,%,$(wildcard molecule/*/molecule.yml))))

.PHONY: preflight venv host-deps docker base-image lint unit molecule test test-quick timed-parts lab lab-destroy \
	bench clean

# Before anything is installed: is Docker possible, is there disk space.
preflight:
	scripts/lab.sh preflight

venv: $(VENV)/.installed
# host-deps first: a fresh machine may lack python3-venv.
$(VENV)/.installed: pyproject.toml scripts/venv.sh | host-deps
	scripts/venv.sh

host-deps:
	scripts/host-deps.sh

docker:
	scripts/docker-engine.sh

base-image: docker host-deps
	scripts/base-image.sh

lint: venv
	ruff check .
	ruff format --check .
	yamllint -s .
	ansible-lint --profile production

# tests/test_lab.py makes docker networks and containers from the base image.
# One worker per core (pytest-xdist); loadgroup keeps the tests marked
# xdist_group (tests/test_lab.py's docker networks on one subnet) on one worker.
unit: venv host-deps base-image
	pytest -n auto --dist loadgroup

# molecule logs "CRITICAL 'molecule/default/molecule.yml' glob failed" before
# each scenario and carries on: it looks for a default scenario to share state
# with, and there is none here by design (each scenario is self-contained).
molecule-%: venv base-image
	molecule test -s $*

molecule: $(addprefix molecule-,$(SCENARIOS))

# The parts of `make test`, one after another; the first failure stops the
# run. Each part's wall time is printed at the end, failed or not.
TEST_PARTS := lint unit $(addprefix molecule-,$(SCENARIOS))
QUICK_PARTS := lint unit

test: preflight venv host-deps base-image
	@$(MAKE) --no-print-directory timed-parts PARTS="$(TEST_PARTS)"

test-quick: venv host-deps base-image
	@$(MAKE) --no-print-directory timed-parts PARTS="$(QUICK_PARTS)"

# Runs each of $(PARTS) as its own make target and prints a table of times.
timed-parts:
	@times=(); failed=""; total_start=$$(date +%s); \
	for part in $(PARTS); do \
	  echo "=== $$part"; start=$$(date +%s); \
	  if $(MAKE) --no-print-directory $$part; then status=passed; else status=FAILED; fi; \
	  times+=("$$(printf '%-22s %6d s  %s' "$$part" $$(( $$(date +%s) - start )) $$status)"); \
	  if [ $$status = FAILED ]; then failed=$$part; break; fi; \
	done; \
	echo "=== time per part"; printf '%s\n' "$${times[@]}"; \
	printf '%-22s %6d s\n' total $$(( $$(date +%s) - total_start )); \
	if [ -n "$$failed" ]; then echo "=== FAILED: $$failed (later parts not run)"; exit 1; fi

lab: preflight venv host-deps base-image
	scripts/lab.sh up

lab-destroy:
	scripts/lab.sh destroy

bench: venv host-deps
	@for script in bench/*.py; do echo "=== $$script"; python $$script; done

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
