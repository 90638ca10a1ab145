# One entry point: `make demo` (CPU demo) and `make test` (test suite) set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: setup test demo demo-edit demo-flags clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	cp requirements.txt $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)

# The CPU demo (README command 1): ARINAR on scikit-learn's 8x8 digits, pixel tokens (2x2 patches =
# 16 tokens of 4 features), scored by a digit classifier. One intra-op thread: the model is tiny.
# FAMILY picks the outer family; its preset <FAMILY>_tiny is the demo's model, all of one size class (about
# 1M parameters): `make demo FAMILY=causal`. The run folder is
# output_dir/demo-<family>-<time> (plain demo-<time> for mar).
# RUN=output_dir/demo-<time> continues that interrupted run in its own folder (--resume), then runs the editing
# check; its FAMILY is read from the folder's name.
RUN_DIR = $(patsubst %/checkpoint-last.pth,%,$(patsubst %/,%,$(RUN)))
RUN_FAMILY = $(filter causal scalewise,$(word 2,$(subst -, ,$(notdir $(RUN_DIR)))))
FAMILY ?= $(or $(RUN_FAMILY),mar)
DEMO_RUN = output_dir/demo$(if $(filter-out mar,$(FAMILY)),-$(FAMILY))
DEMO_FLAGS = --dataset digits --tokenizer pixel --pixel_levels 17 --img_size 8 --patch_size 2 \
	--family $(FAMILY) --model $(FAMILY)_tiny \
	--batch_size 64 --epochs 70 --warmup_epochs 5 --lr 1e-3 --lr_schedule cosine --ema_rate 0.995 \
	--num_workers 0 --log_freq 22 --save_last_freq 10 --online_eval --eval_freq 1000 \
	--num_images 1000 --eval_bsz 500 --num_iter 16 --cfg 3.0 --temperature 1.0

# Training and scoring, then the editing check (demo_edit.py) on the new run (or on RUN, resumed).
demo: $(STAMP)
	run=$(or $(RUN_DIR),$(DEMO_RUN)-$$(date +%Y%m%d-%H%M%S)) && \
	OMP_NUM_THREADS=1 $(PY) main_mar.py $(DEMO_FLAGS) --output_dir $$run$(if $(RUN), --resume $$run) && \
	OMP_NUM_THREADS=1 $(PY) demo_edit.py --ckpt $$run/checkpoint-last.pth && \
	echo "demo run folder: $$run"

# The flags `make demo` passes to main_mar.py for this FAMILY (tests/test_demo.py runs the demo's own recipe).
demo-flags:
	@echo $(DEMO_FLAGS)

# The editing check alone, on the newest output_dir/demo-*/checkpoint-last.pth: held-out digits keep their
# top half, the bottom half is regenerated with the true class and as (label + 1) % 10, and both are scored.
demo-edit: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) demo_edit.py
