# Quick Fix Labels. `make demo` sets up and runs the bundled demo; `make test` runs the tests.
#
#   make fix CHECKPOINT=runs/checkpoint_best.pth DATA=/data/imagenet \
#            [CLASS_ORDER=imagenet_class_index.json] [EPOCHS=5] [LR=0.03,0.1,0.3,1] [WD=0,0.0001]
#
# runs the three stages and reruns only what is stale: a new LR reruns stages 2 and 3 only.
# The fixed model lands in fixed/ beside CHECKPOINT, under its file name, with the feature store
# and the head beside it. Paths must not contain spaces (a limit of make).
PYTHON ?= python3
VENV   ?= .venv
PY     ?= $(VENV)/bin/python
DEMO   ?= demo-out

CHECKPOINT  ?=
DATA        ?=
CLASS_ORDER ?=
FIXDIR      ?= $(patsubst %/,%,$(dir $(CHECKPOINT)))/fixed
OUT         ?= $(FIXDIR)/$(notdir $(CHECKPOINT))
STORE       ?= $(FIXDIR)/features.zarr
HEAD        ?= $(FIXDIR)/head.pt
EPOCHS      ?= 5
LR          ?= 0.03,0.1,0.3,1
WD          ?= 0,0.0001
EXTRACT_FLAGS ?=
TRAIN_FLAGS   ?=
STITCH_FLAGS  ?=

.PHONY: install test test-gpu lint demo bench clean fix FORCE

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

# --- make fix: each stage reruns when its inputs or its own settings changed ---------------
# A settings file is rewritten only when the settings differ, so its date says "changed".
define settings
	@mkdir -p $(@D)
	@printf '%s\n' $(1) > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi
endef

ifneq ($(filter fix,$(MAKECMDGOALS)),)
ifeq ($(strip $(CHECKPOINT)),)
$(error make fix needs CHECKPOINT=path/to/checkpoint_best.pth DATA=path/to/images)
endif
ifeq ($(strip $(DATA)),)
$(error make fix needs DATA=path/to/images (an ImageFolder root with train/ and val/))
endif
endif

fix: $(if $(filter $(VENV)/bin/python,$(PY)),install) $(OUT)
	@echo "fixed checkpoint: $(OUT)"

$(FIXDIR)/.extract.settings: FORCE
	$(call settings,"$(DATA)" "$(CLASS_ORDER)" "$(EXTRACT_FLAGS)")

$(FIXDIR)/.train.settings: FORCE
	$(call settings,"$(EPOCHS)" "$(LR)" "$(WD)" "$(TRAIN_FLAGS)")

$(FIXDIR)/.extract.done: $(CHECKPOINT) $(CLASS_ORDER) $(FIXDIR)/.extract.settings
	$(PY) extract_features.py --checkpoint $(CHECKPOINT) --data-root $(DATA) \
	    $(if $(CLASS_ORDER),--class-order $(CLASS_ORDER)) --out $(STORE) --overwrite \
	    $(EXTRACT_FLAGS)
	touch $@

$(HEAD): $(FIXDIR)/.extract.done $(FIXDIR)/.train.settings
	$(PY) train_head.py --features $(STORE) --checkpoint $(CHECKPOINT) --out $(HEAD) \
	    --epochs $(EPOCHS) --lr $(LR) --weight-decay $(WD) $(TRAIN_FLAGS)

$(OUT): $(HEAD) $(CHECKPOINT)
	$(PY) stitch_checkpoint.py --checkpoint $(CHECKPOINT) --head $(HEAD) --out $(OUT) \
	    --overwrite --verify-data $(DATA) $(STITCH_FLAGS)
