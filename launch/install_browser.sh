#!/usr/bin/env bash
# Installs what the real-browser UI tests need (tests/browser/, tests/test_browser.py):
#   - Debian's chromium at /usr/bin/chromium (apt-get, non-interactive) when it is missing;
#   - playwright-core (pinned in package.json / package-lock.json) into ./node_modules with `npm ci`.
# playwright-core never downloads a browser: the tests point it at /usr/bin/chromium.
# Safe to run again; skips each part that is already in place. Needs root (or sudo) for apt-get.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -x /usr/bin/chromium ]]; then
    echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present) at /usr/bin/chromium"
elif ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium: /usr/bin/chromium is missing and apt-get is not available; install Chromium yourself" \
        "(the browser tests skip without it)" >&2
else
    SUDO=""
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO="sudo -n"
        else
            echo "chromium: need root or sudo to apt-get install chromium; skipping" >&2
        fi
    fi
    if [[ "$(id -u)" == 0 || -n "$SUDO" ]]; then
        echo "chromium: installing with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -q
        $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
        /usr/bin/chromium --version
    fi
fi

# PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core downloads nothing itself, but keep any hook quiet.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if ! command -v npm >/dev/null 2>&1; then
    echo "playwright-core: npm is not installed (install Node.js >= 20); the browser tests skip without it" >&2
    exit 0
fi
want="$(node -p "require('./package.json').devDependencies['playwright-core']")"
have="$(node -p "try { require('./node_modules/playwright-core/package.json').version } catch (e) { '' }")"
if [[ "$have" == "$want" ]]; then
    echo "playwright-core: $have already in node_modules"
else
    echo "playwright-core: npm ci (want $want)"
    npm ci --no-audit --no-fund --ignore-scripts
fi
