# Quick Fix Labels. `make demo` sets up and runs the bundled demo; `make test` runs the tests.
#
#   make fix CHECKPOINT=runs/checkpoint_best.pth DATA=/data/imagenet \
#            [DATASET=imagenet1k | CLASS_ORDER=order.txt] [EPOCHS=N] [LR=0.1,0.3] [WD=0,0.0001]
#
# runs `quickfix-labels` (pipeline/fix.py), which runs the three stages and reruns only what is
# stale: a new LR reruns stages 2 and 3 only. EPOCHS, LR and WD left unset take the command's
# defaults (quickfix-labels --help). The fixed model lands in fixed/ beside CHECKPOINT,
# under its file name, with the feature store and the head beside it. FLAGS (or EXTRACT_FLAGS,
# TRAIN_FLAGS, STITCH_FLAGS) pass any other flag of quickfix-labels. Paths must not contain
# spaces (a limit of make).
PYTHON ?= python3
VENV   ?= .venv
PY     ?= $(VENV)/bin/python
DEMO   ?= demo-out

CHECKPOINT  ?=
DATA        ?=
CLASS_ORDER ?=
DATASET     ?=
FIXDIR      ?= $(patsubst %/,%,$(dir $(CHECKPOINT)))/fixed
STORE       ?=
EPOCHS      ?=
LR          ?=
WD          ?=
FLAGS         ?=
EXTRACT_FLAGS ?=
TRAIN_FLAGS   ?=
STITCH_FLAGS  ?=

.PHONY: install test test-gpu lint demo bench clean fix

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

test-gpu: install
	$(PY) -m pytest -q -m gpu

lint: install
	$(PY) -m ruff check .

demo: install
	$(PY) -m pipeline.demo --out $(DEMO)

bench: install
	$(PY) bench/suite.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache

# --- make fix: quickfix-labels keeps the stages' records and reruns only what is stale ------
ifneq ($(filter fix,$(MAKECMDGOALS)),)
ifeq ($(strip $(CHECKPOINT)),)
$(error make fix needs CHECKPOINT=path/to/checkpoint_best.pth DATA=path/to/images)
endif
ifeq ($(strip $(DATA)),)
$(error make fix needs DATA=path/to/images (an ImageFolder root with train/ and val/))
endif
endif

fix: $(if $(filter $(VENV)/bin/python,$(PY)),install)
	$(PY) -m pipeline --resume $(CHECKPOINT) --data-root $(DATA) --checkpoint-dir $(FIXDIR) \
	    $(if $(DATASET),--dataset $(DATASET)) $(if $(CLASS_ORDER),--class-order $(CLASS_ORDER)) \
	    $(if $(STORE),--features $(STORE)) $(if $(EPOCHS),--fix-epochs $(EPOCHS)) \
	    $(if $(LR),--lr $(LR)) $(if $(WD),--weight-decay $(WD)) \
	    $(FLAGS) $(EXTRACT_FLAGS) $(TRAIN_FLAGS) $(STITCH_FLAGS)
