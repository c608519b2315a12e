# Two commands for a fresh machine: `make demo` (the main job end to end) and `make test` (the suite).
#
# Set-up is cached outside the checkout, keyed by the hash of each lock file, so a fresh clone (CI) reuses the
# virtual environments and jar folders that an earlier clone built from identical locks:
#   $(CACHE)/venv-main-<hash of requirements/main.lock>     -> .venv
#   $(CACHE)/venv-airflow-<hash of requirements/airflow.lock> -> .venv-airflow
#   $(CACHE)/jars-<name>-<hash of infra/<name>/pom.xml>       -> .jars/<name>
# A cache entry is used only when its build finished (it holds a .complete marker). The project itself is not
# installed into the environments: PYTHONPATH points at the checkout.
SHELL := /bin/bash
PY_BASE ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.8
CACHE ?= $(HOME)/.cache/recsys-platform
UV := $(CACHE)/uv-$(UV_VERSION)/bin/uv
MVN := mvn -q -B -s $(CURDIR)/infra/maven-settings.xml
hash = $(shell cat $(1) | sha256sum | cut -c1-16)
# GPU=1 (make setup GPU=1, and on every later make call on that machine, e.g. export GPU=1): .venv from
# requirements/main-gpu.lock, main.lock with FBGEMM's CUDA build (fbgemm-gpu) instead of fbgemm-gpu-cpu, in its own
# cache entry. Without GPU the CPU lock and its cache entry are used exactly as before. See docs/ray.md.
MAIN_LOCK := requirements/main$(if $(filter 1 true yes,$(GPU)),-gpu).lock
MAIN_ENV := $(CACHE)/venv-main-$(call hash,$(MAIN_LOCK))
AIRFLOW_ENV := $(CACHE)/venv-airflow-$(call hash,requirements/airflow.lock)
KAFKA_JARS := $(CACHE)/jars-kafka-$(call hash,infra/kafka/pom.xml infra/maven-settings.xml)
SPARK_JARS := $(CACHE)/jars-spark-$(call hash,infra/spark/pom.xml infra/maven-settings.xml)
PY := .venv/bin/python
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)

.PHONY: setup venv airflow-venv jars data demo demo-generated lineage test test-fast lock kafka-start kafka-stop clean-data

setup: venv airflow-venv jars data

$(UV):
	$(PY_BASE) -m venv $(CACHE)/uv-$(UV_VERSION)
	$(CACHE)/uv-$(UV_VERSION)/bin/pip install -q uv==$(UV_VERSION)

# $(1) cache dir, $(2) lock file, $(3) link name
define build_env
	@if [ ! -f $(1)/.complete ]; then \
	  echo "building $(3) from $(2) in $(1)"; rm -rf $(1) && \
	  $(UV) venv -q --python $(PY_BASE) $(1) && \
	  $(UV) pip install -q -p $(1) --no-deps -r $(2) && touch $(1)/.complete; fi
	@rm -rf $(3) && ln -sfn $(1) $(3)
endef

venv: | $(UV)
	$(call build_env,$(MAIN_ENV),$(MAIN_LOCK),.venv)

airflow-venv: | $(UV)
	$(call build_env,$(AIRFLOW_ENV),requirements/airflow.lock,.venv-airflow)

# $(1) cache dir, $(2) pom folder name
define build_jars
	@if [ ! -f $(1)/.complete ]; then \
	  echo "resolving infra/$(2)/pom.xml into $(1)"; rm -rf $(1) && \
	  (cd infra/$(2) && $(MVN) dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(1)) && \
	  touch $(1)/.complete; fi
	@mkdir -p .jars && rm -rf .jars/$(2) && ln -sfn $(1) .jars/$(2)
endef

jars:
	$(call build_jars,$(KAFKA_JARS),kafka)
	$(call build_jars,$(SPARK_JARS),spark)

data: venv
	$(PY) -m pipelines.data

# Regenerate requirements/main.lock from the top-level pins in requirements/main.in; commit the result.
lock: | $(UV)
	rm -rf /tmp/recsys-lock && $(UV) venv -q --python $(PY_BASE) /tmp/recsys-lock
	$(UV) pip install -q -p /tmp/recsys-lock -r requirements/main.in
	$(UV) pip install -q -p /tmp/recsys-lock --no-deps torchrec==1.9.2  # its CUDA fbgemm-gpu dependency is replaced by fbgemm-gpu-cpu
	$(UV) pip freeze -p /tmp/recsys-lock > requirements/main.lock && rm -rf /tmp/recsys-lock
	sed 's/^fbgemm-gpu-cpu==/fbgemm-gpu==/' requirements/main.lock > requirements/main-gpu.lock

demo: setup
	$(PY) -m pipelines.demo

# The main job with every registered model (make demo trains the configuration's models.demo, five of them).
lineage: setup
	$(PY) -m pipelines.demo --models all

# The main job on the second shipped source: the generator's click log written as Parquet (features/sources/
# generated.yaml), in its own lake and run folder, so that it leaves the MovieLens demo's alone.
DEMO_GENERATED_MODELS ?= deepfm,din,item2vec,mf
demo-generated: setup
	RECSYS_SOURCE=features/sources/generated.yaml RECSYS_DATA_DIR=$(CURDIR)/data/generated-source \
	RECSYS_RUN_NAME=generated $(PY) -m pipelines.demo --models $(DEMO_GENERATED_MODELS)

test: setup browser obp-venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Headless Chromium for tests/test_report.py (the evaluation report opened in a browser): the Debian package,
# installed only when /usr/bin/chromium is missing (apt-get needs root; sudo is used when not root).
.PHONY: browser
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  echo "installing chromium (Debian package) for the report test"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; fi

test-fast: venv
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

kafka-start: jars
	infra/scripts/kafka.sh start
kafka-stop:
	infra/scripts/kafka.sh stop

clean-data:
	infra/scripts/kafka.sh stop || true
	rm -rf data/lake data/checkpoints var artifacts

# Generator benchmarks and the crash test of the streaming ingest (their own brokers on ports 24192/24292).
# INGEST_SIZES / BATCH_SIZES pick the event counts; FAULT_INGEST_KILLS=20 for the long fault run.
INGEST_SIZES ?= 1000000
BATCH_SIZES ?= 1000000,10000000,30000000
.PHONY: bench-ingest bench-batch fault-ingest
bench-ingest: venv jars
	$(PY) -m bench.ingest --sizes $(INGEST_SIZES)
bench-batch: venv jars
	$(PY) -m bench.batch_features --sizes $(BATCH_SIZES)
# fault-ingest: 5 SIGKILLs of the continuous ingest with the speed layer (15 minutes on the shared 2-core machine at
# load 10; not in the default suite), then bronze exactly once and speed tables equal to the daily job's rows.
fault-ingest: venv jars
	$(PY) -m pytest -m fault -s -p no:cacheprovider tests/test_ingest_kill.py $(PYTEST_ARGS)

# Resume-after-failure test of training: SIGKILLs one Ray Train worker mid-epoch, checks the resumed run matches
# an uninterrupted one (about 3 minutes on 2 cores).
.PHONY: fault-train
fault-train: venv
	$(PY) -m pytest -m fault -s -p no:cacheprovider tests/test_train_fault.py $(PYTEST_ARGS)

# Scale run (training/scale.py): DIN with a 10M-row item table (640 MB of float32 weights) under a 512 MiB
# per-worker budget that one worker cannot meet; 2 Ray Train workers each hold their row-wise shard and print
# per-rank rows, bytes and RSS. SCALE_ARGS passes options (--items, --budget-mib, --steps ...).
SCALE_ARGS ?=
.PHONY: scale-train
scale-train: venv
	$(PY) -m training.scale $(SCALE_ARGS)

# Model benchmark (bench/models.py): DeepFM/DIN/item2vec against DeepCTR-Torch, RecBole and gensim on the lake's
# exports (run `make demo` first); the peers' environment is built by bench.models from
# bench/requirements-peers.lock into $(CACHE)/venv-peers-<hash of the lock>. Parts: deepfm, item2vec, din,
# generated (DeepFM on the first 1M events of the generated 10M-event stream), scale (training.scale);
# BENCH_MODELS_ARGS="--parts din,scale" re-runs only some and keeps the others' figures.
.PHONY: bench-models
BENCH_MODELS_ARGS ?=
bench-models: venv | $(UV)
	CACHE=$(CACHE) $(PY) -m bench.models --uv $(UV) $(BENCH_MODELS_ARGS)

# Hyper-parameter search (bench/tune.py) for DeepFM and DIN on the validation split (test read only for the
# defaults and the chosen values), one Ray cluster for all trials, ~45 min on 2 cores; TUNE_ARGS passes options
# (--trials 12,8 --seeds 0,1,2 --top 2 --peer-seeds). Writes the "tuning" section and docs/tuning_valid_auc.png.
.PHONY: tune
TUNE_ARGS ?=
tune: venv
	CACHE=$(CACHE) $(PY) -m bench.tune $(TUNE_ARGS)

# Serving benchmark (bench/serving_load.py): wrk at 64 connections on loopback against the service over the demo's
# artifacts (run `make demo` first) and a plain FastAPI app in the same run, a hot swap under load, ANN recall@10
# (HNSW and LSH vs exact); then where a request's time goes, in one process (bench/serving_profile.py).
.PHONY: bench-serving
bench-serving: venv
	$(PY) -m bench.serving_load
	$(PY) -m bench.serving_profile

# Open Bandit Pipeline for the replay-estimator cross-check in tests/test_estimators.py (skipped without it): its own
# small environment from requirements/obp.lock (obp 0.5.7 declares Python < 3.11, hence pip --ignore-requires-python
# and --no-deps), cached as $(CACHE)/venv-obp-<hash of the lock>, linked as .venv-obp; it sees .venv's packages
# through a .pth file, so it holds only obp and the few packages .venv lacks.
OBP_ENV := $(CACHE)/venv-obp-$(call hash,requirements/obp.lock requirements/main.lock)
.PHONY: obp-venv
obp-venv: venv
	@if [ ! -f $(OBP_ENV)/.complete ]; then \
	  echo "building .venv-obp from requirements/obp.lock in $(OBP_ENV)"; rm -rf $(OBP_ENV) && \
	  $(PY_BASE) -m venv $(OBP_ENV) && \
	  $(CURDIR)/.venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
	    > $$($(OBP_ENV)/bin/python -c "import site; print(site.getsitepackages()[0])")/main-venv.pth && \
	  $(OBP_ENV)/bin/pip install -q --no-deps --ignore-requires-python -r requirements/obp.lock && \
	  touch $(OBP_ENV)/.complete; fi
	@rm -rf .venv-obp && ln -sfn $(OBP_ENV) .venv-obp

# Airflow scheduler backfill (tests/test_scheduler_backfill.py): api-server, dag-processor and scheduler
# (LocalExecutor, SQLite) in a temporary AIRFLOW_HOME backfill three days of features_daily twice (six spark-submit
# runs of pipelines/daily_features.py). Outside the default suite (13 minutes on the shared 2-core machine);
# AIRFLOW_SCHEDULER_TEST=1 opts in. Ports: AIRFLOW_TEST_PORT (default 28780) and the next one.
.PHONY: test-scheduler
test-scheduler: venv airflow-venv jars data
	AIRFLOW_SCHEDULER_TEST=1 $(PY) -m pytest -s -p no:cacheprovider tests/test_scheduler_backfill.py $(PYTEST_ARGS)

# The scheduled DAGs with `airflow dags test` (tests/test_dags.py, the last test): features_daily for one day, train
# with each model submitted to a local Ray head through the Jobs API (ports RECSYS_TEST_RAY_PORT, default 29300, and
# the next 65), evaluate_and_publish. Outside the default suite (three trainings); AIRFLOW_DAGS_E2E=1 opts in.
.PHONY: test-dags-e2e
test-dags-e2e: venv airflow-venv jars data
	AIRFLOW_DAGS_E2E=1 $(PY) -m pytest -s -p no:cacheprovider tests/test_dags.py \
	  -k test_scheduled_dags_run_end_to_end_with_training_as_ray_jobs $(PYTEST_ARGS)
