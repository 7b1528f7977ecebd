# Sourced by the scripts: make (or reuse) a virtual environment holding this project with some extras.
# usage: ensure_venv DIR EXTRAS  (EXTRAS "" for the plain serving install, "dev" for development)
set -euo pipefail

ensure_venv() {
  local dir=$1 extras=$2 python=${PYTHON:-python3}
  local spec="." editable=()
  if [[ -n $extras ]]; then spec=".[$extras]"; editable=(--editable); fi
  # Reinstall only when the project metadata changed: a warm start stays fast.
  local stamp
  stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$extras
  if [[ -x $dir/bin/python && -f $dir/.foldserve-stamp && $(cat "$dir/.foldserve-stamp") == "$stamp" ]]; then
    return 0
  fi
  echo "setting up $dir (${extras:-serving install}) ..." >&2
  "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
    --constraint constraints.txt "${editable[@]}" "$spec" >&2
  echo "$stamp" > "$dir/.foldserve-stamp"
}
