#!/usr/bin/env bash
# Checks dpmove on a machine with an NVIDIA GPU: builds this checkout into a fresh venv, runs the
# gpu-marked tests and `dpmove bench copy --gpu cuda`, prints a summary and the bench table last.
# Logs and copy.json go to ${OUT:-./gpu_check_out}. Exit status 0 only when every step passed.
# Arguments go to bench/gpu_check.py (--emulated, --budget SECONDS, --keep-venv, --bench-args ...).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-$(command -v python3 || true)}"
if [ -z "$py" ]; then
  echo "gpu_check: python3 not found on PATH (set PYTHON=/path/to/python3)" >&2
  exit 2
fi
# At most 8 minutes in all: gpu_check.py keeps its steps inside --budget (470 s by default);
# this outer limit only catches a hang of the script itself.
if command -v timeout >/dev/null 2>&1; then
  exec timeout -k 10 480 "$py" "$here/gpu_check.py" --python "$py" "$@"
fi
exec "$py" "$here/gpu_check.py" --python "$py" "$@"
