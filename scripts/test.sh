#!/usr/bin/env bash
# README command (b): install what the tests need, then lint, type-check and run the whole suite.
#
# Run as root on Debian 12 with Python 3.11 (apt installs Dovecot, Postfix and the real mail clients
# the integration tests drive). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k smtp`.
# .ci/run runs exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'test.sh: %s\n' "$*"; }

bash scripts/install-test-deps.sh

if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv
fi
say "installing the gateway, its test dependencies and the provider sandbox into .venv"
# The sandbox (sandbox/, package mailgw_sandbox) is its own distribution: the product never carries it.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' -e ./sandbox

say "ruff check"
.venv/bin/ruff check .
say "ruff format --check"
.venv/bin/ruff format --check .
say "mypy (gateway/ and the sandbox; [tool.mypy] in pyproject.toml)"
.venv/bin/mypy

say "pytest"
exec .venv/bin/pytest "$@"
