# make figures: every figure from the recorded results in figures/data/ (figures/make_all.py)
# make report:  the figures, then papers/report.md from papers/report.template.md (papers/build.py)
# make edit-trajectory-data: re-record figures/data/edit_trajectory.json (one CPU fit and edit, ~2 min)
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
# this checkout's packages first, whatever copy of splatopt the interpreter has installed (another worktree's)
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH),)

.PHONY: figures report edit-trajectory-data

figures:
	$(PYTHON) figures/make_all.py

report: figures
	$(PYTHON) papers/build.py

edit-trajectory-data:
	$(PYTHON) figures/data_edit_trajectory.py
