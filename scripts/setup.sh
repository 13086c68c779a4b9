#!/usr/bin/env bash
# Set up normlab in ./.venv on a fresh machine.
#   scripts/setup.sh          the library, the lab and the CLI
#   scripts/setup.sh --dev    plus the test tools (and Chromium for the report test, via apt)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="lab"
if [[ "${1:-}" == "--dev" ]]; then extras="dev"; fi

python3 -m venv .venv
# constraints.txt pins torch to the CPU build that lies on this disk (an unpinned torch pulls a
# multi-GB CUDA build); pyproject.toml itself accepts a range of torch releases.
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$extras]"

if [[ "$extras" == "dev" ]] && ! command -v chromium >/dev/null 2>&1; then
  # The report test opens index.html in headless Chromium; it skips with a reason without it.
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped"
  else
    echo "setup: chromium not installed (needs root and apt-get); the browser test will be skipped"
  fi
fi
echo "setup: done (.venv)"
