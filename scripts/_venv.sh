# Sourced by the scripts: make (or reuse) a virtual environment holding this project with some extras.
# usage: ensure_venv DIR EXTRAS  (EXTRAS "" for the plain serving install, "dev" for development)
#
# The project is installed editable, the serving install too: the environment imports this
# checkout's code, so an edit or a pull is what the next start runs, with nothing reinstalled.
# Only the dependencies are fixed at install time: they are reinstalled when pyproject.toml or
# constraints.txt change.
set -euo pipefail

ensure_venv() {
  local dir=$1 extras=$2 python=${PYTHON:-python3}
  local spec="."
  if [[ -n $extras ]]; then spec=".[$extras]"; fi
  local stamp
  stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$extras
  # NOTE: an environment made before the serving install was editable holds a copy of the code
  # as it was then; it has no __editable__ hook, and is made again.
  if [[ -x $dir/bin/python && -f $dir/.foldserve-stamp && $(cat "$dir/.foldserve-stamp") == "$stamp" ]] &&
    compgen -G "$dir/lib/python*/site-packages/__editable__*foldserve*" > /dev/null; then
    return 0
  fi
  echo "setting up $dir (${extras:-serving install}) ..." >&2
  "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
    --constraint constraints.txt --editable "$spec" >&2
  echo "$stamp" > "$dir/.foldserve-stamp"
}
