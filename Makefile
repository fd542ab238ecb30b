# The two commands of the README:
#   make serve   set everything up, then serve the default model on http://127.0.0.1:8000
#   make test    set everything up (with the test dependencies), then run the CPU test suite
# Both are idempotent: the set-up steps are skipped while their inputs are unchanged (scripts/setup.sh).
#
# Variables: ARGS (extra arguments of `python -m inf_llm.serve`,
#   e.g. ARGS="--config config/working/qwen-4b-inf-llm.yaml"), PYTEST_ARGS (e.g. PYTEST_ARGS="tests/test_config.py -x"),
#   PYTHON (interpreter that creates the venv).

VENV ?= .venv
export VENV
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup setup-test serve test

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

serve: setup
	$(PY) -m inf_llm.serve $(ARGS)

# pytest exits 5 when it collected no test: say so and succeed (an empty selection is not a failure).
test: setup-test
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc
