# Shared by scripts/run and scripts/test: make ./.venv with Python >= 3.11 and install
# this project into it with the given extras. Sourced, not executed.

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  echo "installing Debian packages: $*" >&2
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$@" >/dev/null
}

ensure_venv() {  # ensure_venv [extras]   e.g. ensure_venv "test,lint"
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: need Python >= 3.11 as '$PYTHON' (set PYTHON=/path/to/python3.11)" >&2
    exit 2
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
      apt_install python3-venv  # Debian and Ubuntu ship venv separately
      rm -rf "$VENV"
      "$PYTHON" -m venv "$VENV"
    fi
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  local target="."
  [ -n "${1:-}" ] && target=".[$1]"
  "$VENV/bin/python" -m pip install -q -e "$target"
}

# Synapse for the e2e tests (tests/e2e) and scripts/world, in a virtualenv of its own:
# Synapse's bcrypt 5 breaks the passlib that mitmproxy imports, so they never share one.
# Built once (pip install takes a while); exported as SIDECAR_TEST_SYNAPSE_VENV for the tests.
SYNAPSE_VENV=${SIDECAR_TEST_SYNAPSE_VENV:-.venv-synapse}
SYNAPSE_REQUIREMENT=${SYNAPSE_REQUIREMENT:-matrix-synapse==1.163.2}  # the version docs/design.md §2 observed

ensure_synapse_venv() {
  if ! "$SYNAPSE_VENV/bin/python" -c 'import synapse' 2>/dev/null; then
    echo "building $SYNAPSE_VENV: pip install $SYNAPSE_REQUIREMENT (once)" >&2
    "$PYTHON" -m venv "$SYNAPSE_VENV"
    "$SYNAPSE_VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$SYNAPSE_VENV/bin/python" -m pip install -q "$SYNAPSE_REQUIREMENT"
  fi
  SIDECAR_TEST_SYNAPSE_VENV=$(cd "$SYNAPSE_VENV" && pwd)
  export SIDECAR_TEST_SYNAPSE_VENV
}
