# Payguard: the two commands of a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo test lint unit services-up services-down build release bench clean-services model model-venv api-fuzz

## Build and run the self-contained demo (simulator -> SQL -> memory store, HTTP API on :8080).
demo:
	$(CARGO) run --release -- demo

## Start Kafka + PostgreSQL (installing what is missing), then lint and run every test.
test: services-up lint
	$(CARGO) test --all-targets

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## Schemathesis against the demo's /openapi.json (fails on any 5xx).
api-fuzz: build
	bash .ci/api-fuzz.sh

## Unit tests only (no services needed).
unit:
	$(CARGO) test --lib

build:
	$(CARGO) build

release:
	$(CARGO) build --release

services-up:
	bash .ci/services.sh up

services-down:
	bash .ci/services.sh down

## The fraud model, reproduced: simulate 18 days (seed 42) -> replay without a model -> train.
## Deterministic; about 3 minutes with a release binary. PAYGUARD= another binary, MODEL_DATA= scratch dir.
PAYGUARD ?= target/release/payguard
MODEL_DATA ?= target/model-data
MODEL_VENV ?= models/.venv

model-venv:
	test -x $(MODEL_VENV)/bin/python || python3 -m venv $(MODEL_VENV)
	$(MODEL_VENV)/bin/pip install -q -r models/requirements.txt

model: model-venv
	test -x $(PAYGUARD) || $(CARGO) build --release
	mkdir -p $(MODEL_DATA)
	$(PAYGUARD) generate --config config.toml --count 1100000 --seed 42 --labels \
	  --label-delay-min-days 1 --label-delay-max-days 3 --output $(MODEL_DATA)/train.jsonl -q
	$(PAYGUARD) replay --config config.toml --no-model \
	  --input $(MODEL_DATA)/train.card.jsonl --input $(MODEL_DATA)/train.pix.jsonl \
	  --input $(MODEL_DATA)/train.wallet.jsonl --input $(MODEL_DATA)/train.transfer.jsonl \
	  --labels $(MODEL_DATA)/train.labels.jsonl --output $(MODEL_DATA)/train.parquet
	$(MODEL_VENV)/bin/python models/train.py --config config.toml --input $(MODEL_DATA)/train.parquet \
	  --output models/fraud_model.onnx --card models/MODEL_CARD.md --parity models/parity \
	  --previous models/fraud_model.onnx
