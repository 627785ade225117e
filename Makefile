# make test   — create/reuse the virtualenv, install requirements, run the test suite
# make venv   — only build the virtualenv
# The virtualenv lives OUTSIDE the clone, keyed by a hash of the requirements files, so a fresh
# clone (or CI) reuses it and a change of requirements builds a new one.
PYTHON   ?= python3
REQ_HASH := $(shell cat requirements.txt requirements-nodeps.txt | sha256sum | cut -c1-12)
VENV     ?= $(HOME)/.cache/g2rpo/venv-$(REQ_HASH)
PY       := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test venv clean-venv

venv: $(VENV)/.installed

# no prerequisite on purpose: the hash in $(VENV) already names the requirements' content, and a
# fresh clone's newer requirements.txt must not trigger a rebuild
$(VENV)/.installed:
	@echo "building virtualenv in $(VENV) (first time: ~6 GB, several minutes)"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	touch $@

# pytest exits 5 when it collects no test: that is a failure here, not a pass.
test: venv
	@$(PY) -m pytest -q $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests -- treating as failure"; exit 1; fi; \
	exit $$rc

clean-venv:
	rm -rf $(VENV)

# The virtualenv's folder (build it first with make venv), e.g.  . $$(make -s venv-path)/bin/activate
.PHONY: venv-path
venv-path:
	@echo $(VENV)

# The small CPU world end to end: base model (pretrained on first use, ~5 min) and its rewards,
# G2RPO on 2 processes, then the trained model's rewards and samples. Run again, it starts over
# (--overwrite replaces the previous demo run in $(DEMO_OUT)).
DEMO_OUT ?= runs/demo
.PHONY: demo
demo: venv
	$(PY) -m toy --T 8 --n 16 --grid $(DEMO_OUT)/base_samples.png
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc_per_node 2 train.py --out $(DEMO_OUT) --overwrite
	$(PY) -m toy --dir $(DEMO_OUT)/final --T 8 --n 16 --grid $(DEMO_OUT)/final_samples.png

# Evaluate (Table 1 layout) the toy base model into runs/eval; EVAL_ARGS adds flags, e.g.
#   make eval EVAL_ARGS="--model toy runs/demo/final"   (table with differences + grid.png)
EVAL_ARGS ?=
.PHONY: eval
eval: venv
	$(PY) evaluate.py $(EVAL_ARGS)

# Benchmarks: not tests. bench-algos = G2RPO and the baselines from the same base, 3 seeds,
# same iterations and same rollout budget, plus the Lambda ablation (89 min on 2 cores; a
# finished leg is kept, so an interrupted run continues). Results: $(BENCH_OUT)/results.md, *.png
BENCH_OUT ?= runs/bench
BENCH_ARGS ?=
.PHONY: bench bench-algos bench-lora bench-equal bench-scale
bench: bench-algos
bench-algos: venv
	$(PY) bench/algos.py --out $(BENCH_OUT) $(BENCH_ARGS)

# LoRA vs full fine-tuning (3 seeds) and the reward-hacking guard on a 150-iteration run: ~35 min on 2 cores.
# Results: $(BENCH_LORA_OUT)/results.md (a finished run is kept: call again to continue)
BENCH_LORA_OUT ?= runs/bench-lora
bench-lora: venv
	$(PY) bench/lora_guard.py --out $(BENCH_LORA_OUT)

# Equal compute (bench/README.md, "Equal compute: the protocol"): a cheaper G2RPO against G2RPO and MixGRPO,
# learning rate selected per method, and the ablations. 95 min on 2 cores shared with other work; resumable.
BENCH_EQUAL_OUT ?= runs/bench-equal
bench-equal: venv
	$(PY) bench/equal.py --out $(BENCH_EQUAL_OUT)

# One GPU, a few minutes: FLUX.1-dev's width (2 + 4 of its blocks) measured against the fake-tensor prediction,
# the PPO ratio at the first update in bf16. Results: runs/gpu-check/results.md (GPU_ARGS="--device cpu --tiny" on CPU)
GPU_ARGS ?=
.PHONY: gpu-check
gpu-check: venv
	$(PY) bench/gpu_check.py $(GPU_ARGS)

# The paper's setting on fake tensors (no GPU): memory per phase, FLOPs, time and traffic per rank at world sizes
# 8 and 16, and one GPU with LoRA; ~3.5 min of CPU per world size. Results: runs/bench-scale/results.md
bench-scale: venv
	$(PY) bench/scale.py
