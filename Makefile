# Two commands for a fresh machine: `make demo` (the main job end to end) and `make test` (the suite).
# Every set-up step below is cached: the virtual environments and jar folders are rebuilt only when their lock
# file (requirements/*.lock, infra/*/pom.xml) is newer than the stamp left by the last build.
SHELL := /bin/bash
PY_BASE ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.8
VENV := .venv
AIRFLOW_VENV := .venv-airflow
PY := $(VENV)/bin/python
UV := .tools/bin/uv
MVN := mvn -q -B -s infra/maven-settings.xml
PYTEST_ARGS ?=

.PHONY: setup venv airflow-venv jars data demo test test-fast lock clean-data kafka-start kafka-stop bench

setup: venv jars data

$(UV):
	$(PY_BASE) -m venv .tools
	.tools/bin/pip install -q uv==$(UV_VERSION)

venv: $(VENV)/.stamp
$(VENV)/.stamp: requirements/main.lock pyproject.toml | $(UV)
	rm -rf $(VENV)
	$(UV) venv -q --python $(PY_BASE) $(VENV)
	$(UV) pip install -q -p $(VENV) --no-deps -r requirements/main.lock
	$(UV) pip install -q -p $(VENV) --no-deps -e .
	touch $@

airflow-venv: $(AIRFLOW_VENV)/.stamp
$(AIRFLOW_VENV)/.stamp: requirements/airflow.lock | $(UV)
	rm -rf $(AIRFLOW_VENV)
	$(UV) venv -q --python $(PY_BASE) $(AIRFLOW_VENV)
	$(UV) pip install -q -p $(AIRFLOW_VENV) --no-deps -r requirements/airflow.lock
	touch $@

jars: .jars/kafka/.stamp .jars/spark/.stamp
.jars/%/.stamp: infra/%/pom.xml infra/maven-settings.xml
	rm -rf .jars/$*
	cd infra/$* && $(MVN) dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=../../.jars/$*
	touch $@

data: venv
	$(PY) -m pipelines.movielens

# Regenerate the lock files from the top-level pins (requirements/*.in); commit the result.
lock: | $(UV)
	$(UV) venv -q --python $(PY_BASE) /tmp/recsys-lock && $(UV) pip install -q -p /tmp/recsys-lock -r requirements/main.in \
	  && $(UV) pip install -q -p /tmp/recsys-lock --no-deps torchrec==1.9.2 \
	  && $(UV) pip freeze -p /tmp/recsys-lock > requirements/main.lock && rm -rf /tmp/recsys-lock

demo: setup airflow-venv
	$(PY) -m pipelines.demo

test: setup airflow-venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

kafka-start: jars
	infra/scripts/kafka.sh start
kafka-stop:
	infra/scripts/kafka.sh stop

bench: setup
	$(PY) -m bench.run

clean-data:
	infra/scripts/kafka.sh stop || true
	rm -rf data/lake data/checkpoints var artifacts
