# Shared by scripts/run and scripts/test: make ./.venv with Python >= 3.11 and install
# this project into it with the given extras. Sourced, not executed.

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  echo "installing Debian packages: $*" >&2
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
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
