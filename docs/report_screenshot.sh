#!/usr/bin/env bash
# Renders an evaluation report's report.html in headless Chromium (Debian's `chromium`
# package), saves a full-page screenshot, and checks that the browser shows every image.
#
#   docs/report_screenshot.sh REPORT_DIR [OUT.png]
#
# Exits 1 when an image did not render. The report records, once loaded, how many of its images
# the browser decoded (`data-images-shown="N/M"` on <body>); --dump-dom reads that back.
set -euo pipefail
dir="${1:?usage: docs/report_screenshot.sh REPORT_DIR [OUT.png]}"
out="${2:-$dir/report.png}"
html="$(cd "$dir" && pwd)/report.html"
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
  --disable-background-networking --disable-component-update --disable-sync
  --hide-scrollbars --user-data-dir="$(mktemp -d)" --virtual-time-budget=5000)
chromium "${flags[@]}" --window-size=1280,4000 --screenshot="$out" "file://$html" 2>/dev/null
shown=$(chromium "${flags[@]}" --dump-dom "file://$html" 2>/dev/null |
  sed -n 's/.*data-images-shown="\([0-9]*\/[0-9]*\)".*/\1/p' | head -n 1)
echo "screenshot: $out; images shown: ${shown:-unknown}"
[ -n "$shown" ] && [ "${shown%/*}" = "${shown#*/}" ]
