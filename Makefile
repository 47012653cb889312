# Two commands for a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   set up, then simulate 20 agents x 30 rounds on a local Mosquitto
#   make test   set up, then lint (ruff, mypy), then run the test suite
#   make lint   ruff and mypy only (the rules and packages are in pyproject.toml)
#   make pi-check  (root, slow) deploy/pi/install.sh and two agents on an emulated arm64 Raspberry Pi OS userland
.PHONY: setup demo lint test bench pi-check clean

setup:
	@scripts/bootstrap.sh

demo: setup
	.venv/bin/fedge simulate --agents 20 --rounds 30 --out runs/demo-$$(date +%Y%m%d-%H%M%S)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

test: setup lint
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python -m bench.simulate_acceptance

# needs root, debootstrap, qemu-user-static, mosquitto and the network; prints {"skipped": ...} without them
pi-check: setup
	.venv/bin/python -m bench.pi_arm64

clean:
	rm -rf .venv runs .pytest_cache .hypothesis *.egg-info
