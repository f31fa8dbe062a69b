# The two commands of a fresh machine:
#   make demo   - the main job end to end on the built-in default
#   make test   - the test suite
# Both create or reuse the cached venv first (scripts/venv.sh).
SHELL := /bin/bash
VENV = $(shell scripts/venv.sh)

.PHONY: demo test venv
venv:
	@scripts/venv.sh

demo:
	@venv=$$(scripts/venv.sh) && "$$venv/bin/vpr" demo $(ARGS)

test:
	@venv=$$(scripts/venv.sh) && PATH="$$venv/bin:$$PATH" LD_LIBRARY_PATH="$$venv/lib$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" \
	  "$$venv/bin/python" -m pytest $(ARGS)
