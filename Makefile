# Two entry points: `make demo` (main job on the embedded mini world) and `make test`.
# Both install what they need into .venv (and the Fashion-MNIST Debian package when missing).
VENV ?= .venv
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ ! -f $(FMNIST) ] && [ -z "$$DFQ_FMNIST_DIR" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[export,test]'
	touch $@

demo: setup
	OMP_NUM_THREADS=2 $(VENV)/bin/dfq run configs/demo.yaml

test: setup
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest -p no:cacheprovider --durations=10
