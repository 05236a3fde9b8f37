#!/usr/bin/env bash
# bgtasks' Flask, WSGI and adoption tests on the oldest Flask pyproject.toml allows
# (flask[async]>=3.0), under -W error; the dev venv tests the newest that resolves.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DIR=${ADOPTION_DIR:-$ROOT/.adoption}
OLDEST=${FLASK_OLDEST:-3.0.0}
PY=$DIR/venv-flask-$OLDEST/bin/python
mkdir -p "$DIR"
[ -x "$PY" ] || python3 -m venv "$DIR/venv-flask-$OLDEST"
"$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[fastapi]" "flask[async]==$OLDEST" \
  pytest pytest-timeout httpx asgi-lifespan trio gunicorn 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import importlib.metadata as m; print('Flask', m.version('flask'))"
"$PY" -m pytest -q -p no:cacheprovider -W error tests/test_flask.py tests/test_wsgi.py \
  tests/test_adoption.py
