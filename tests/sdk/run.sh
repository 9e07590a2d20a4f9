#!/usr/bin/env bash
# Criteo's official Python SDKs, unchanged, against `criteo-token-proxy --dev`
# (tests/sdk/test_sdk.py). Run by .ci/run after `cargo test`.
#
# The SDKs come from PyPI at a pinned version into a virtualenv kept under
# target/ between runs. When the package index cannot be reached at all, the
# test is skipped with a message saying so; any other failure fails it.
set -euo pipefail
cd "$(dirname "$0")/../.."

SDK_VERSION=2027.1.0.261026
VENV=target/sdk-venv
PACKAGES=(
  "criteo-api-marketingsolutions-sdk==$SDK_VERSION"
  "criteo-api-retailmedia-sdk==$SDK_VERSION"
)

if ! command -v python3 >/dev/null; then
  echo "tests/sdk: python3 is needed to run Criteo's Python SDKs" >&2
  exit 1
fi

if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "${PACKAGES[*]}" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  if ! log=$("$VENV/bin/pip" install --quiet --disable-pip-version-check \
      --no-input --timeout 30 "${PACKAGES[@]}" 2>&1); then
    index=$("$VENV/bin/pip" config get global.index-url 2>/dev/null \
      || echo "${PIP_INDEX_URL:-https://pypi.org/simple}")
    if ! "$VENV/bin/python" - "$index" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=15)
except Exception as e:  # DNS, refused, timeout, proxy: unreachable
    if getattr(e, "code", None) is None:
        sys.exit(1)
PY
    then
      echo "tests/sdk: SKIPPED: the package index $index cannot be reached; Criteo's SDKs were not tested" >&2
      rm -rf "$VENV"
      exit 0
    fi
    echo "$log" >&2
    echo "tests/sdk: installing ${PACKAGES[*]} failed although $index answers" >&2
    exit 1
  fi
  echo "${PACKAGES[*]}" > "$VENV/.installed"
fi

cargo build --locked --quiet --bin criteo-token-proxy
exec "$VENV/bin/python" tests/sdk/test_sdk.py target/debug/criteo-token-proxy
