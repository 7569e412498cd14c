# carbonscale: two entry points for a new user.
#   make lab    a real multi-host Graphite cluster in containers, deployed by site.yml
#   make test   everything CI runs: lint, unit tests, every molecule scenario
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# Every scenario under molecule/ (the shared base in molecule/_shared is not one).
SCENARIOS ?= $(sort $(notdir $(patsubst %/molecule.yml,%,$(wildcard molecule/*/molecule.yml))))

.PHONY: preflight venv host-deps docker base-image lint unit molecule test lab lab-destroy bench clean

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
unit: venv host-deps base-image
	pytest

# molecule logs "CRITICAL 'molecule/default/molecule.yml' glob failed" before
# each scenario and carries on: it looks for a default scenario to share state
# with, and there is none here by design (each scenario is self-contained).
molecule: venv base-image
	@for scenario in $(SCENARIOS); do \
	  echo "=== molecule test -s $$scenario"; \
	  start=$$(date +%s); \
	  molecule test -s $$scenario || exit 1; \
	  echo "=== $$scenario passed in $$(( $$(date +%s) - start )) s"; \
	done

test: preflight lint unit molecule

lab: preflight venv host-deps base-image
	scripts/lab.sh up

lab-destroy:
	scripts/lab.sh destroy

bench: venv host-deps
	@for script in bench/*.py; do echo "=== $$script"; python $$script; done

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
