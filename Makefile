# The two front-door commands. Each sets up what it needs on first use, in .venv/:
#   make quickstart   the offline main job (a tiny GPT-2 on bundled example data; no ../shared needed)
#   make test         the test suite (the README's command; CI runs exactly this)
# TORCH_SPEC picks the torch build pip installs first (default: the pinned CPU build CI uses), e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url URL_OF_YOUR_CUDA_WHEEL_INDEX"
# A changed pyproject.toml (or TORCH_SPEC) refreshes the environment; otherwise a second call starts at once.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: quickstart test test-fast clean-venv FORCE

quickstart: $(VENV)/.installed-run
	$(PY) -m sftune train --config configs/quickstart.yaml --output-dir runs/quickstart --overwrite

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# the interpreter, and torch first (pinned: an unpinned torch pulls a multi-GB CUDA build); the file holds
# the installed TORCH_SPEC and changes only when it does, so the installs below rerun only then
$(VENV)/.torch: FORCE
	@test -x $(PY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@[ "$$(cat $@ 2>/dev/null)" = "$(TORCH_SPEC)" ] || { \
		echo "installing $(TORCH_SPEC) into $(VENV)"; \
		$(PY) -m pip install --quiet $(TORCH_SPEC) && echo "$(TORCH_SPEC)" > $@; }

FORCE:

$(VENV)/.installed-run: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@

clean-venv:
	rm -rf $(VENV)
