# make test   — create/reuse the virtualenv, install requirements, run the test suite
# make venv   — only build the virtualenv
# The virtualenv lives OUTSIDE the clone, keyed by a hash of the requirements files, so a fresh
# clone (or CI) reuses it and a change of requirements builds a new one.
PYTHON   ?= python3
REQ_HASH := $(shell cat requirements.txt requirements-nodeps.txt | sha256sum | cut -c1-12)
VENV     ?= $(HOME)/.cache/g2rpo/venv-$(REQ_HASH)
PY       := $(VENV)/bin/python
PYTEST_ARGS ?=
# test files run side by side, one worker per core (a file's tests stay together: they share its runs), each worker
# on one thread (two workers of two threads each on two cores spin more than they compute)
TEST_WORKERS ?= auto

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
	@OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests; rc=$$?; \
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
.PHONY: bench bench-algos bench-lora bench-equal bench-scale bench-scale-families
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

# The same for the other families at their released configs and usual training sizes (bench/released.py): SD3.5
# Medium (512 px), SD3.5 Large (1024 px), Qwen-Image (1024 px); 8 GPUs full fine-tuning and one GPU with LoRA each.
# Results: runs/bench-scale/<family>/results.md
bench-scale-families: venv
	$(PY) bench/scale.py --family sd3.5-medium
	$(PY) bench/scale.py --family sd3.5-large
	$(PY) bench/scale.py --family qwen-image

# The whole GPU path in a GPU's first ten minutes (bench/gpu_smoke.py): train.py at world sizes 1 and 2 (bf16, probes,
# checkpoints, --resume, best/, final/), LoRA, HSDP, evaluate.py at world sizes 1 and 2 with every reward model, then
# gpu-check; on a tiny FLUX built from configs. One PASS/FAIL line per step; $(SMOKE_OUT)/results.md; exit 1 if any
# failed. SMOKE_DEVICE=cpu runs the same on gloo (~6 min on 2 cores). On a GPU node without internet, whose Python has
# its own torch: make gpu-smoke SMOKE_PY=python3 (no virtualenv is built; README: "A GPU node: its own torch").
SMOKE_DEVICE ?= cuda
SMOKE_OUT ?= runs/gpu-smoke
SMOKE_ARGS ?=
SMOKE_PY ?=
.PHONY: gpu-smoke
gpu-smoke: $(if $(SMOKE_PY),,venv)
	$(or $(SMOKE_PY),$(PY)) bench/gpu_smoke.py --device $(SMOKE_DEVICE) --out $(SMOKE_OUT) $(SMOKE_ARGS)

# On a machine WITH internet: every package of the virtualenv except torch, torchvision and their CUDA wheels (triton,
# nvidia-*, cuda-*) as wheels for the GPU node's Python and platform (compiled ones too: numpy, scipy, tokenizers, ...),
# at the versions `make venv` resolved, into $(WHEELHOUSE); carry that folder to the node and run `make node-install`
# there. WHEEL_PY: the node's `python3 -c 'import sys; print(sys.version[:4])'`; WHEEL_PLATFORMS: glibc 2.28 or newer.
WHEELHOUSE ?= runs/wheelhouse
WHEEL_PY ?= 3.12
WHEEL_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64
NOT_IN_WHEELHOUSE := ^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==
.PHONY: wheelhouse node-install
wheelhouse: venv
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PY) -m pip freeze --all --exclude-editable | grep -viE '$(NOT_IN_WHEELHOUSE)' > $(WHEELHOUSE)/lock.txt
	grep -viE '$(NOT_IN_WHEELHOUSE)' requirements.txt > $(WHEELHOUSE)/requirements-node.txt
	cp requirements-nodeps.txt $(WHEELHOUSE)/requirements-nodeps.txt
	$(PY) -m pip download --no-deps --only-binary=:all: --implementation cp --python-version $(WHEEL_PY) \
		$(foreach p,$(WHEEL_PLATFORMS),--platform $(p)) -d $(WHEELHOUSE) -r $(WHEELHOUSE)/lock.txt
	@echo "$(WHEELHOUSE): $$(ls $(WHEELHOUSE)/*.whl | wc -l) wheels, $$(du -sh $(WHEELHOUSE) | cut -f1); on the node: make node-install WHEELHOUSE=..."

# On the GPU node (no internet): the project's packages from the wheelhouse into NODE_PY's environment; the node's
# torch (and its torchvision) stay as they are: pip takes every requirement that is already met from what is installed.
NODE_PY ?= python3
node-install:
	$(NODE_PY) -c 'import torch, torchvision; print("node torch", torch.__version__, "CUDA", torch.version.cuda, "torchvision", torchvision.__version__)'
	$(NODE_PY) -m pip install --isolated --no-index --find-links $(WHEELHOUSE) -r $(WHEELHOUSE)/requirements-node.txt
	$(NODE_PY) -m pip install --isolated --no-index --find-links $(WHEELHOUSE) --no-deps -r $(WHEELHOUSE)/requirements-nodeps.txt
	$(NODE_PY) -c 'import torch; print("torch still", torch.__version__)'
