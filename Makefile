# scdeep_nb — the two commands a new user needs:
#   make demo   # set up .venv, run the CPU-sized benchmark (every method vs the classical baselines) -> runs/demo/
#   make test   # set up .venv, run the test suite (library tests + every notebook through papermill + nbdev hygiene)
# Both create .venv on first use; torch is installed first, pinned, so pip does not fetch a CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
KERNEL := scdeep_nb
STAMP  := $(VENV)/.installed

.PHONY: install demo bench-smoke test test-fast nbtest export clean-nbs check-nbdev docs-check readme lab clean

install: $(STAMP)

$(STAMP): settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (scdeep_nb)"
	touch $(STAMP)

## the main job: the CPU-sized benchmark (every registered method against the classical baselines, task by task,
## on simulated data with truth and the PBMC counts bundled with scanpy) -> runs/demo/ (table, figures, notebooks)
demo: $(STAMP)
	$(BIN)/python -m scdeep_nb.bench nbs/bench/cpu.yaml --jobs 2 --kernel $(KERNEL) --out runs/demo
	@echo "Results in runs/demo/: results table (.csv), report notebook and figures, every executed notebook"

## the same benchmark at smoke size (a minute or two: checks that it runs end to end, not which method wins)
bench-smoke: $(STAMP)
	$(BIN)/python -m scdeep_nb.bench nbs/bench/smoke.yaml --jobs 2 --kernel $(KERNEL) --out runs/smoke

## the test suite (what CI runs)
test: $(STAMP)
	$(BIN)/python -m pytest tests -q -ra

## library tests only (skips the notebook runs)
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -ra -m "not notebooks"

## nbdev's own notebook runner (honours tst_flags: notest slow gpu)
nbtest: $(STAMP)
	$(BIN)/nbdev_test --n_workers 1

export: $(STAMP)
	$(BIN)/nbdev_export

clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean

## fail if exporting or cleaning the notebooks would change tracked files
check-nbdev: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean
	git diff --exit-code -- scdeep_nb nbs

## process the notebooks for Quarto (what nbdev_proc_nbs does, without its attempt to download Quarto)
docs-check: $(STAMP)
	$(BIN)/python -c "from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar; from nbdev.serve import proc_nbs; \
	refresh_quarto_yml(); nbdev_sidebar.__wrapped__(); print(proc_nbs(force=True, n_workers=1))"

## README.md from nbs/index.ipynb (nbdev_readme needs Quarto; this drops hidden cells and converts the rest)
readme:
	$(PYTHON) .ci/make_readme.py

lab: $(STAMP)
	$(BIN)/jupyter lab nbs

clean:
	rm -rf _proc _docs runs .pytest_cache
