# The two commands a new user needs. Both set up the environment first (idempotent).
.PHONY: setup demo test bench clean
PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m rl.pipeline experiment=walk

test: setup
	@bash scripts/run_tests.sh

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf outputs .pytest_cache
