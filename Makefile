.PHONY: install lint test test-ipython8 bench demo

install:
	python -m pip install -e ".[dev]"

lint:
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
	mypy
	lint-imports

test:
	python -m pytest

# The kernel tests whose subject differs between IPython 8 and 9 (the environment has one),
# on IPython 8 installed apart, in .ipython8/.
test-ipython8:
	python -m pip install --quiet --target .ipython8 "ipython>=8.12,<9" decorator
	RTQ_TEST_IPYTHON8=$(CURDIR)/.ipython8 python -m pytest tests/test_magic.py -k ipython_8

bench:
	python benchmarks/run.py

demo:
	rtq demo
