#!/usr/bin/env bash
# Runs every benchmark behind BENCHMARKS.md in one go and writes what they
# print to target/benchmarks.md. Takes about 3 minutes once built on a
# 2-core machine (under 10 with a cold build); `--quick` takes about 1.
#
#   benches/run.sh            # the recorded run
#   benches/run.sh --quick    # a smoke run: fewer rounds, shorter trials
set -euo pipefail
cd "$(dirname "$0")/.."

quick=()
criterion=(--warm-up-time 1 --measurement-time 3)
if [[ "${1:-}" == "--quick" ]]; then
  quick=(--quick)
  criterion=(--warm-up-time 0.5 --measurement-time 1)
fi

# Default features (no `tracing`), as users get them. Build everything first,
# so that the timed runs do not share the machine with the compiler.
cargo bench --no-run

out=target/benchmarks.md
{
  echo "Run of $(date -u +%Y-%m-%dT%H:%MZ): $(nproc) cores," \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'),"
  echo "load average before the run $(cut -d' ' -f1-3 /proc/loadavg), $(rustc --version)"
  cargo bench --bench scenarios -- "${quick[@]}"
  cargo bench --bench memory
  cargo bench --bench http -- "${quick[@]}"
  echo
  echo "load average after the run $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo '#### Criterion: 1,000 calls, bare service against the layer'
  echo
  echo '```'
  cargo bench --bench coalescing -- "${criterion[@]}" 2>&1 \
    | grep -E '^[0-9]+ calls/|time:' || true
  echo '```'
} | tee "$out"
echo "Written to $out"
