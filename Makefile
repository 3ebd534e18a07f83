# gmmseg-d2: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The demo trains one model of the open-world benchmark (benchmarks/open_world.py)
# and scores its checkpoint with every anomaly score; the recorded runs of the
# same model family and seed (benchmarks/recorded/open_world/) are shown next
# to it, so that the demo trains one model, not two.
DEMO_MODEL ?= maskformer2_R18
DEMO_OUTPUT ?= output/demo
DEMO_CONFIG = $(DEMO_MODEL)_gmm
# The benchmark's run name (the GMM Mask2Former's runs keep their recorded name).
DEMO_RUN = $(if $(filter maskformer2_R18,$(DEMO_MODEL)),gmmseg_maskformer2_R18,$(DEMO_CONFIG))_seed0
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets

.PHONY: setup data demo demo-per-pixel test clean

# Idempotent: a second run only checks the environment (a few seconds).
setup:
	@bash tools/setup_env.sh

# Generates the procedural texture benchmark under $(DETECTRON2_DATASETS)/textures
# once (~1 min); a later run only checks its manifest.
data: setup
	@$(PY) datasets/prepare_textures.py --root "$(DETECTRON2_DATASETS)"

# GMMSeg-Mask2Former-R18 (DEMO_MODEL=fcn_R18 or deeplabv3plus_R18: the per-pixel
# GMM models): train on textures_sem_seg_train, then mIoU on the test split and
# density vs MSP vs the post-hoc Gaussian on near- and far-OOD, one checkpoint.
demo: setup data
	$(PY) benchmarks/open_world.py --models $(DEMO_MODEL) --classifiers gmm --seeds 0 \
		--output-dir $(DEMO_OUTPUT) --recorded $(DEMO_OUTPUT)/recorded \
		--figure $(DEMO_OUTPUT)/histograms.png --figure-run $(DEMO_MODEL) gmm 0 \
		--summary --reference benchmarks/recorded/open_world
	$(PY) tools/visualize_predictions.py --config-file configs/textures/$(DEMO_CONFIG).yaml \
		--output $(DEMO_OUTPUT)/predictions.png OUTPUT_DIR $(DEMO_OUTPUT)/$(DEMO_RUN) \
		MODEL.WEIGHTS $(DEMO_OUTPUT)/$(DEMO_RUN)/model_final.pth \
		DATASETS.TEST "('textures_sem_seg_test', 'textures_anomaly_near_test')"
	@echo "Raw results: $(DEMO_OUTPUT)/recorded/$(DEMO_RUN).json  histograms: $(DEMO_OUTPUT)/histograms.png" \
		" predictions: $(DEMO_OUTPUT)/predictions.png  (rm -r $(DEMO_OUTPUT) to train again)"

# The per-pixel GMMSeg model (FCN-R18) on the same benchmark.
demo-per-pixel:
	@$(MAKE) demo DEMO_MODEL=fcn_R18 DEMO_OUTPUT=output/demo_per_pixel

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf output
