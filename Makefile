# Two entry points: `make demo` and `make test`. Both create .venv on first use and install the package
# with the exact versions in constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY_MODEL := runs/worlds/tiny-sd

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

$(TINY_MODEL)/model_index.json: | $(STAMP)
	$(PY) -m genalign.worlds.tiny $(TINY_MODEL) --pretrain-steps 300

demo: $(STAMP) $(TINY_MODEL)/model_index.json
	$(PY) -m genalign.cli finetune --config configs/demo.yaml
	$(PY) -m genalign.cli gallery --run runs/demo --n 4

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench.py --out runs/bench.json

clean:
	rm -rf runs/demo runs/bench.json
