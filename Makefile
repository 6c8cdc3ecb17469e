# Payguard: the two commands of a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo test lint unit services-up services-down build release bench clean-services api-fuzz

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
