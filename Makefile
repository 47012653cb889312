# Two commands for a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   set up, then simulate 20 agents x 30 rounds on a local Mosquitto
#   make test   set up, then run the test suite
.PHONY: setup demo test bench clean

setup:
	@scripts/bootstrap.sh

demo: setup
	.venv/bin/fedge simulate --agents 20 --rounds 30 --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python -m bench.simulate_acceptance

clean:
	rm -rf .venv runs .pytest_cache .hypothesis *.egg-info
