# The two commands of the README. Both create/reuse .venv (scripts/setup-venv.sh) first.
#   make demo   – the main job on the embedded default (tiny local model, real vLLM CPU engine)
#   make test   – the test suite (real engine, real models built locally)
.PHONY: demo test setup

setup:
	@scripts/setup-venv.sh

demo: setup
	.venv/bin/parityrl demo

test: setup
	.venv/bin/python -m pytest
