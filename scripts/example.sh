#!/usr/bin/env bash
# Set up everything on a fresh machine and run the FastAPI example on http://127.0.0.1:8000
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh fastapi,prometheus
exec .venv/bin/python -m uvicorn examples.fastapi_app.app:app --host 127.0.0.1 --port "${PORT:-8000}"
