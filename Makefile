# gmmseg-d2: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?= configs/mosaic/gmmseg_maskformer2_R18.yaml
DEMO_OUTPUT ?= output/demo
# The softmax baseline's numbers from a recorded run of the same schedule and
# seed (benchmarks/mosaic_models.py, see BENCHMARKS.md), shown next to the
# demo's own so that the demo trains one model, not two.
DEMO_BASELINE ?= benchmarks/recorded/mosaic_maskformer2_R18_softmax_seed0.json
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets

.PHONY: setup data demo demo-per-pixel test clean

# Idempotent: a second run only checks the environment (a few seconds).
setup:
	@bash tools/setup_env.sh

# Generates the embedded mosaic dataset under $(DETECTRON2_DATASETS)/mosaic once.
data: setup
	@$(PY) datasets/prepare_mosaic.py --root "$(DETECTRON2_DATASETS)"

demo: setup data
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT)
	$(PY) tools/visualize_predictions.py --config-file $(DEMO_CONFIG) \
		--output $(DEMO_OUTPUT)/predictions.png \
		OUTPUT_DIR $(DEMO_OUTPUT) MODEL.WEIGHTS $(DEMO_OUTPUT)/model_final.pth
	@echo
	@$(PY) tools/print_results.py "GMM, this run ($(notdir $(DEMO_CONFIG)))=$(DEMO_OUTPUT)/eval_results.json" \
		"softmax, recorded run (MSP score)=$(DEMO_BASELINE)"
	@echo "Results: $(DEMO_OUTPUT)/eval_results.json  picture: $(DEMO_OUTPUT)/predictions.png"

# The per-pixel GMMSeg model (FCN-R18) against its recorded softmax baseline.
demo-per-pixel:
	@$(MAKE) demo DEMO_CONFIG=configs/mosaic/fcn_R18_gmm.yaml DEMO_OUTPUT=output/demo_per_pixel \
		DEMO_BASELINE=benchmarks/recorded/mosaic_fcn_R18_softmax_seed0.json

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf output
