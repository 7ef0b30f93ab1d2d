#!/usr/bin/env bash
# The Python environment of the Python package's tests (crates/broker-python): a venv with
# Rasa 3.6.21's own code (installed without its ML dependencies, see docs/python.md) and the
# pinned set that Rasa's brokers, tracker stores, events and exporter need, plus maturin and
# pytest. Idempotent: a venv that already has everything is left alone.
#   usage: .ci/python-env.sh [VENV]   (default: .venv-rasa in the repository root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${1:-${BROKER_PYTHON_VENV:-$PWD/.venv-rasa}}"
python="${PYTHON:-python3}"
stamp="$venv/.broker-python-env"
want="rasa==3.6.21 $(sha256sum .ci/python-requirements.txt | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "python-env: creating $venv (Rasa 3.6.21 without its ML dependencies)"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# Rasa 3.6.21 says Requires-Python <3.11 and pulls TensorFlow and spaCy: only its code is needed.
"$venv/bin/pip" install -q --no-deps --ignore-requires-python rasa==3.6.21
# (pip then warns that rasa wants setuptools 70.3: harmless, its code does not use it.)
"$venv/bin/pip" install -q -r .ci/python-requirements.txt
"$venv/bin/python" -W ignore -c 'import rasa.core.brokers.kafka, rasa.core.brokers.pika, rasa.core.brokers.sql, rasa.core.tracker_store, rasa.core.exporter, pytest'
echo "$want" > "$stamp"
