#!/usr/bin/env bash
# On the device machine, from the repository root (the device tool's working directory):
#   bash benchmarks/gpu/run.sh probe   # first call: what the image has, into $OUT (a minute)
#   bash benchmarks/gpu/run.sh         # install what carry/ brings, then the check (at most 8 minutes)
# Both write only under $OUT, the folder the device tool brings back.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:?run this through the device tool, which sets OUT}"
PY="${PYTHON:-python3}"

if [ "${1:-}" = "probe" ]; then
  $PY -m pip freeze > "$OUT/device-freeze.txt" 2>&1
  $PY -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")' > "$OUT/python-version.txt"
  { nvidia-smi; df -h /tmp .; nproc; ls /usr/share/datasets/fashion-mnist; } > "$OUT/machine.txt" 2>&1
  echo "probe: $(wc -l < "$OUT/device-freeze.txt") packages, python $(cat "$OUT/python-version.txt")"
  exit 0
fi

CARRY=benchmarks/gpu/carry
# The data where a user's machine has it (apt-get install dataset-fashion-mnist), so every step finds it as there.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -d "$CARRY/fashion-mnist" ]; then
  mkdir -p /usr/share/datasets/fashion-mnist && cp "$CARRY"/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
fi
# No network there: only the carried wheels, without resolving (prepare.py chose exactly what the image lacks).
install() { $PY -m pip install -q --no-index --no-deps "$@" || $PY -m pip install -q --break-system-packages --no-index --no-deps "$@"; }
if compgen -G "$CARRY/wheels/*.whl" > /dev/null; then install "$CARRY"/wheels/*.whl > "$OUT/install.log" 2>&1; fi
install -e . >> "$OUT/install.log" 2>&1
export PATH="$($PY -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
timeout 590 $PY benchmarks/gpu/check.py --device cuda --out "$OUT/check" --budget_s "${BUDGET_S:-480}"
