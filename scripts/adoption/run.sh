#!/usr/bin/env bash
# Adoption check: run Flask's own test suite and FastAPI's tutorial tests twice,
# as shipped in their sdists (for the versions installed here), once plain and
# once with bgtasks installed in every app they create (bgtasks_adoption.py).
# Fails if a single test passes in one run and not in the other.
#
#   bash scripts/adoption/run.sh [flask] [fastapi]      (default: both)
#
# Work files go to $ADOPTION_DIR (default .adoption/): a venv per suite with its
# test dependencies, the sdists, and each run's JUnit XML and log.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DIR=${ADOPTION_DIR:-$ROOT/.adoption}
SUITES=("$@")
[ ${#SUITES[@]} -eq 0 ] && SUITES=(flask fastapi)
mkdir -p "$DIR"
# One venv per suite: Flask's tests need pytest < 9 (their conftest uses a private
# name pytest 9 removed), FastAPI's need pytest >= 9.
venv() {  # venv <suite> -> prints its python, with the suite's test dependencies
  local py=$DIR/venv-$1/bin/python
  [ -x "$py" ] || python3 -m venv "$DIR/venv-$1" >&2
  local deps
  case $1 in
    flask) deps=("$ROOT[flask]" "pytest<9" asgiref greenlet python-dotenv) ;;
    fastapi) deps=("$ROOT[fastapi]" "pytest>=9,<9.2" pytest-timeout "anyio[trio]" httpx
                   "httpx2>=2" dirty-equals inline-snapshot pyjwt "pwdlib[argon2]" sqlmodel
                   pyyaml python-multipart email-validator flask a2wsgi typer
                   opentelemetry-sdk opentelemetry-instrumentation-fastapi
                   opentelemetry-exporter-otlp-proto-http pytest-xdist pydantic-settings
                   strawberry-graphql) ;;
  esac
  "$py" -m pip install -q --disable-pip-version-check -e "${deps[@]}" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  echo "$py"
}

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

fetch() {  # fetch <dist> -> prints the unpacked sdist directory
  local dist=$1 ver
  ver=$(version "$dist")
  local name
  name=$(echo "$dist" | tr 'A-Z' 'a-z')
  if [ ! -d "$DIR/src/$name-$ver" ]; then
    mkdir -p "$DIR/src" "$DIR/sdist"
    "$PY" -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
      -d "$DIR/sdist" "$dist==$ver" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    tar xzf "$DIR/sdist/$name-$ver.tar.gz" -C "$DIR/src"
  fi
  echo "$DIR/src/$name-$ver"
}

run_suite() {  # run_suite <label> <dir> <adopt 0|1> <pytest args...>
  local label=$1 dir=$2 adopt=$3
  shift 3
  # A copy per run: the two run side by side, and some tests write files in it.
  rm -rf "$DIR/run/$label"
  mkdir -p "$DIR/run"
  cp -r "$dir" "$DIR/run/$label"
  (cd "$DIR/run/$label" && BGTASKS_ADOPT=$adopt BGTASKS_ADOPT_REPORT="$DIR/$label.apps" \
    PYTHONPATH="$ROOT/scripts/adoption" \
    "$PY" -m pytest -q -p no:cacheprovider -p bgtasks_adoption --continue-on-collection-errors \
      --junitxml="$DIR/$label.xml" "$@" >"$DIR/$label.log" 2>&1) || true
}

status=0
for suite in "${SUITES[@]}"; do
  PY=$(venv "$suite")
  case $suite in
    flask)
      src=$(fetch Flask)
      args=(tests) ;;
    fastapi)
      src=$(fetch fastapi)
      args=(tests/test_tutorial) ;;
    *) echo "unknown suite: $suite" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  # Both runs at once: one per core.
  run_suite "$suite-plain" "$src" 0 "${args[@]}" &
  run_suite "$suite-bgtasks" "$src" 1 "${args[@]}" &
  wait
  if ! "$PY" "$ROOT/scripts/adoption/compare.py" "$suite" "$DIR/$suite-plain.xml" \
      "$DIR/$suite-bgtasks.xml" "$DIR/$suite-bgtasks.apps" "$(($(date +%s) - start))"; then
    status=1
    echo "--- $suite with bgtasks: log tail ---"
    tail -40 "$DIR/$suite-bgtasks.log"
  fi
done
exit $status
