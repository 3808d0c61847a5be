# Two entry points for a fresh machine: `make demo` (engine build + image, CPU) and `make test`.
PYTHON ?= python
# The embedded default: our CIFAR-10 model (weights/, 15 MB; 64x64 images, the prompt is a CIFAR class name).
MODEL ?= infinity-cifar
RESOLUTION ?=
BACKEND ?= onnxruntime
ATTENTION ?= sparvar
ifeq ($(MODEL),infinity-cifar)
WEIGHTS ?= weights/infinity-cifar.safetensors
VAE ?= weights/infinity-cifar-tokenizer.safetensors
PROMPT ?= airplane
else
WEIGHTS ?=
VAE ?=
PROMPT ?= a photo of a cat
endif
OUT ?= out/$(MODEL).png
STAMP := .install.stamp

WEIGHT_ARGS = $(if $(WEIGHTS),--weights $(WEIGHTS) --vae $(VAE),--random-weights)
RES_ARGS = $(if $(RESOLUTION),--resolution $(RESOLUTION),)
BATCH ?= 1
# opt-in: CSLA over 2-D query tiles, e.g. CSLA_QUERY_TILE=8x8 (ATTENTION=sparvar, Infinity; docs/sparvar.md)
CSLA_QUERY_TILE ?=
TILE_ARGS = $(if $(CSLA_QUERY_TILE),--csla-query-tile $(CSLA_QUERY_TILE),)
# the directory names the tile as the engine spec spells it ("08x8" is "8x8"): one tile, one directory
TILE_NAME = $(shell echo '$(CSLA_QUERY_TILE)' | sed -E 's/(^|x)0+([0-9])/\1\2/g')
# a RESOLUTION given gets its own directory (one engine directory holds one build: 512 had replaced 256's)
ENGINE_DIR ?= engines/$(MODEL)$(if $(RESOLUTION),-$(RESOLUTION),)-$(ATTENTION)-$(BACKEND)$(if $(filter-out 1,$(BATCH)),-batch$(BATCH),)$(if $(CSLA_QUERY_TILE),-tiles$(TILE_NAME),)

.PHONY: install test demo engine generate serve bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q torch==2.13.0 || $(PYTHON) -c "import torch"
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# the suite on TEST_WORKERS processes (pytest-xdist), one test file per worker at a time, so a file's module
# fixtures (engines built for its tests) are made once; the session's engines are shared through a lock
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

engine: $(STAMP)
	$(PYTHON) -m sparvar.cli engine build --model $(MODEL) $(WEIGHT_ARGS) $(RES_ARGS) --attention $(ATTENTION) --backend $(BACKEND) --batch $(BATCH) $(TILE_ARGS) --engine-dir $(ENGINE_DIR)

generate: $(STAMP)
	$(PYTHON) -m sparvar.cli generate --engine $(ENGINE_DIR) $(RES_ARGS) --prompt "$(PROMPT)" --out $(OUT)

# A long-lived process answering POST /generate from the built engine (README: serving).
serve: $(STAMP)
	$(PYTHON) -m sparvar.cli serve --engine $(ENGINE_DIR)

# The README's main command: build the embedded default engine, then generate an image through it.
demo: engine generate

bench: $(STAMP)
	$(PYTHON) -m sparvar.cli bench e2e

docs: $(STAMP)
	$(PYTHON) tools/plot_masks.py

clean:
	rm -rf engines/*/ out/ $(STAMP)
