#!/usr/bin/env bash
# One report of every nightly matrix cell: Markdown to the CI summary ($GITHUB_STEP_SUMMARY, or
# standard output elsewhere) and one HTML page, DIR/report.html.
# Usage: ci/summary.sh DIR   (DIR holds one directory per cell, each with suites/result.json)
# Exit status: 0 rendered; 1 no cell left a result (each cell's log says why); 2 bad usage.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:?usage: ci/summary.sh DIR}
if [ ! -d "$dir" ]; then echo "ci/summary.sh: $dir is not a directory" >&2; exit 2; fi

runs=()
for r in "$dir"/*/suites; do
  if [ -f "$r/result.json" ]; then runs+=("$r"); fi
done
if [ "${#runs[@]}" -eq 0 ]; then
  echo "ci/summary.sh: no cell under $dir left a suites/result.json; see each cell's job log" >&2
  exit 1
fi
"$here/.venv/bin/pkvm-harness" report "${runs[@]}" --format html -o "$dir/report.html"
"$here/.venv/bin/pkvm-harness" report "${runs[@]}" >> "${GITHUB_STEP_SUMMARY:-/dev/stdout}"
