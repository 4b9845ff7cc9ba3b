#!/usr/bin/env bash
# Install the real client applications the end-to-end tests drive (tests/test_e2e_*.py):
#   * a separate venv with the official `openai` and `anthropic` SDKs (they need newer h11/httpx stacks than
#     mitmproxy 11 allows, so they live apart, as a real separate application would), and `pyspark` when a Java
#     runtime is present (tests/test_readers.py reads a capture with Spark in local mode);
#   * Debian's `chromium`, `curl` and `libnss3-tools` (certutil), only if missing.
# Idempotent and cached: the venv is reused while it imports both SDKs. Never fails the caller: anything that
# cannot be installed is reported as a warning, and the tests that need it skip with the reason.
#
# Usage: bash scripts/install-clients.sh        venv path: $MITM_SSE_CLIENTS_VENV
#        (default ~/.cache/mitm-sse/venv-clients, which is where the tests look too)
set -u
VENV="${MITM_SSE_CLIENTS_VENV:-$HOME/.cache/mitm-sse/venv-clients}"
PY="${MITM_SSE_CLIENTS_PYTHON:-python3}"
warn() { echo "install-clients: WARNING: $*" >&2; }

# ---- the SDK venv -----------------------------------------------------------------------------------------
want=(openai anthropic)
imports="import openai, anthropic"
if command -v java >/dev/null 2>&1; then
    want+=(pyspark)
    imports="$imports, pyspark"
else
    warn "no java: pyspark not installed, the Spark reader test will skip"
fi
versions() { "$VENV/bin/python" -c "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in '${want[*]}'.split()))"; }
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$imports" 2>/dev/null; then
    echo "install-clients: client venv ready at $VENV ($(versions))"
else
    echo "install-clients: installing ${want[*]} into $VENV"
    [ -x "$VENV/bin/python" ] || { rm -rf "$VENV"; mkdir -p "$(dirname "$VENV")"; "$PY" -m venv "$VENV"; }
    if [ -x "$VENV/bin/python" ] \
        && "$VENV/bin/python" -m pip install -q --upgrade pip \
        && "$VENV/bin/python" -m pip install -q "${want[@]}"; then
        echo "install-clients: installed $(versions)"
    else
        warn "could not install ${want[*]} into $VENV: the SDK / Spark end-to-end tests will skip"
    fi
fi

# ---- Debian packages --------------------------------------------------------------------------------------
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v certutil >/dev/null 2>&1 || missing+=(libnss3-tools)
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-clients: curl, chromium and certutil present"
elif ! command -v apt-get >/dev/null 2>&1; then
    warn "no apt-get: cannot install ${missing[*]}; the tests that need them will skip"
else
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    echo "install-clients: apt-get install ${missing[*]}"
    if $SUDO apt-get update -qq >/dev/null \
        && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        echo "install-clients: installed ${missing[*]}"
    else
        warn "apt-get install ${missing[*]} failed: the tests that need them will skip"
    fi
fi
exit 0
