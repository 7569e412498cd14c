# carbonscale: two entry points for a new user.
#   make lab    a real multi-host Graphite cluster in containers, deployed by site.yml
#   make test   everything CI runs: lint, unit tests, every molecule scenario
#               (the cluster scenario beside the others; each part's time
#               printed at the end, and which part and tests failed)
#   make test-quick   lint + unit tests only: the inner loop
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# Every scenario under molecule/ (the shared base in molecule/_shared is not one).
SCENARIOS ?= $(sort $(notdir $(patsubst %/molecule.yml,%,$(wildcard molecule/*/molecule.yml))))

.PHONY: preflight venv host-deps docker base-image lint unit molecule test test-quick timed-parts lab lab-destroy lab-expand lab-shrink \
	bench clean test-vm

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
# The 25 slowest tests are listed at the end of the log: where the time goes.
unit: venv host-deps base-image
	pytest -n auto --dist loadgroup --durations=25

# molecule logs "CRITICAL 'molecule/default/molecule.yml' glob failed" before
# each scenario and carries on: it looks for a default scenario to share state
# with, and there is none here by design (each scenario is self-contained).
# profile_tasks: each task's time and the slowest tasks at the end of each
# converge, in the part's log: where a scenario spends its time.
molecule-%: venv base-image
	ANSIBLE_CALLBACKS_ENABLED=ansible.posix.profile_tasks molecule test -s $*

molecule: $(addprefix molecule-,$(SCENARIOS))

# The stages of `make test` (scripts/timed-parts.sh): lint, then two lanes at
# once: the cluster scenario (the longest part) in one, the unit tests and the
# other scenarios one after another in the other, so the cluster does not wait
# for the unit tests. A failing lint stops the run; a failing part stops its
# lane. Each part's time is printed at the end, with the failing tests of a
# part that failed.
OTHER_SCENARIOS := $(filter-out cluster,$(SCENARIOS))
TEST_LANES := molecule-cluster | unit $(addprefix molecule-,$(OTHER_SCENARIOS))

test: preflight venv host-deps base-image
	@scripts/timed-parts.sh lint "$(TEST_LANES)"

test-quick: venv host-deps base-image
	@scripts/timed-parts.sh lint unit

# The kernel tests (tests/test_vm_*.py, marker vm): IPVS and a write-back
# dm-cache in a Debian 12 VM under qemu, which the containers' shared kernel
# cannot carry. The image (scripts/vm-image.sh) is built once into .cache/vm.
# -s: the ipvsadm tables and the halt journal they print are the evidence.
test-vm: venv
	pytest -m vm -s -v -p no:cacheprovider --durations=0 --basetemp=.cache/vm/run tests/test_vm_*.py

# Any parts, one after another, timed: make timed-parts PARTS="lint molecule-migrate".
timed-parts:
	@scripts/timed-parts.sh $(PARTS)

lab: preflight venv host-deps base-image
	scripts/lab.sh up

lab-destroy:
	scripts/lab.sh destroy

# Against the running lab: expand.yml (decommission.yml) adds (removes) the
# spare storage host while a stream goes through the VIP; prints what arrived.
lab-expand:
	scripts/lab.sh expand

lab-shrink:
	scripts/lab.sh shrink

bench: venv host-deps
	@for script in bench/*.py; do echo "=== $$script"; python $$script; done

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
