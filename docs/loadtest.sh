#!/usr/bin/env bash
# Starts `retina-infer serve` on a free loopback port, sends it a bounded load with
# `retina-infer loadtest`, prints the report, then stops the server with SIGTERM.
#
#   docs/loadtest.sh [CONCURRENCY] [REQUESTS] [-- extra serve flags]
#   e.g. docs/loadtest.sh 32 3000 -- --max-batch 16 --max-wait-ms 5
#
# PROFILE=release uses the release build (default: the dev build, whose dependencies are -O3).
set -euo pipefail
cd "$(dirname "$0")/.."
concurrency="${1:-32}"
requests="${2:-3000}"
shift $(( $# >= 2 ? 2 : $# ))
[ "${1:-}" = "--" ] && shift
profile="${PROFILE:-debug}"
flag=$([ "$profile" = release ] && echo --release || true)
cargo build --quiet $flag --workspace --bins
bin="${CARGO_TARGET_DIR:-target}/$profile/retina-infer"
log=$(mktemp)
"$bin" serve --addr 127.0.0.1:0 --backend cpu "$@" > "$log.out" 2> "$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  url=$(sed -n 's/^listening on //p' "$log.out")
  [ -n "$url" ] && curl -sf "$url/readyz" > /dev/null 2>&1 && break
  sleep 0.1
done
[ -n "${url:-}" ] || { echo "server did not start:" >&2; cat "$log" >&2; exit 1; }
echo "server $url ($*), $concurrency clients, $requests requests" >&2
"$bin" loadtest --url "$url" --concurrency "$concurrency" --requests "$requests" \
  assets/samples/images/*.png ${LOADTEST_FLAGS:-}
kill -TERM $pid
wait $pid || true
trap - EXIT
echo "server log: $(wc -l < "$log") lines, last: $(tail -n 1 "$log")" >&2
