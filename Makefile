# The two commands of the README. Both create/reuse .venv (scripts/setup-venv.sh) first.
#   make demo   – the main job on the embedded default (tiny local model, real vLLM CPU engine)
#   make test   – the test suite (real engine, real models built locally); what CI runs
#   make test-quick – the tests that need no engine (the inner loop: a couple of minutes)
.PHONY: demo test test-quick setup bench

setup:
	@scripts/setup-venv.sh

demo: setup
	.venv/bin/parityrl demo

# Two workers, a file each at a time (pytest-xdist): an engine start keeps one core busy
# importing vLLM while the other waits; files share engines within their worker. The files go
# out longest first (tests/conftest.py LONGEST_FIRST), not in xdist's order by test count.
test: setup
	.venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test-quick: setup
	.venv/bin/python -m pytest -m "not slow"

# Not run by CI: speed of every stage against its anchor (about 5 min on 2 cores).
bench: setup
	.venv/bin/parityrl bench
