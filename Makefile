.PHONY: install lint test bench demo

install:
	python -m pip install -e ".[dev]"

lint:
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
	mypy
	lint-imports

test:
	python -m pytest

bench:
	python benchmarks/run.py

demo:
	rtq demo
