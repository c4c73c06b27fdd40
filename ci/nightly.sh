#!/usr/bin/env bash
# The nightly job for one matrix cell: set up the machine (the README's `make setup`), build the
# kernel, run the suites on QEMU, and leave a run directory with result.json, junit.xml and the
# reports (report.md, report.html). GitHub Actions calls it (.github/workflows/nightly.yml); any
# other CI can call it the same way.
#
# Usage: ci/nightly.sh [--cpu max|cortex-a72|...] [--el2-debug on|off] [--kernel 6.12|6.1|7.3|7.2 |
#                      --kernel-src PATH | --kernel-git URL [--kernel-ref REF]] [--out DIR] [-- PYTEST_ARGS...]
#   --cpu         QEMU -cpu (max: hVHE on 6.12, nVHE on 6.1; cortex-a72: nVHE); default max
#   --el2-debug   on: a debug kernel (NVHE_EL2_DEBUG); off: the kernel as it ships; default on
#   --kernel      Debian's linux-source-X.Y; default 6.12
#   --kernel-src  a kernel tree or tarball
#   --kernel-git  fetch REF (default master) of this git URL, shallow, and test that tree instead
#   --out         where the results go; default runs/nightly-<kernel>-<cpu>-<time>
# Exit status, passed on unchanged: pytest's own (0 all passed, 1 a test failed, 2 interrupted,
# 3 internal error, 4 bad usage, 5 no tests), 2 for a bad argument to this script, and the
# harness's codes, clear of pytest's: 10 panic, 11 timeout, 12 infrastructure, 13 kernel build
# failure (harness/errors.py; docs/exit-codes.md).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cpu=max
el2_debug=on
kernel_src=""
kernel=""
git_url=""
git_ref=master
out=""

usage() { echo "ci/nightly.sh: $*; see the usage at the top of ci/nightly.sh" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=${2:?}; shift 2 ;;
    --el2-debug) el2_debug=${2:?}; shift 2 ;;
    --kernel) kernel=${2:?}; shift 2 ;;
    --kernel-src) kernel_src=${2:?}; shift 2 ;;
    --kernel-git) git_url=${2:?}; shift 2 ;;
    --kernel-ref) git_ref=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    --) shift; break ;;
    *) usage "unknown argument '$1'" ;;
  esac
done
sources=0
for given in "$kernel" "$kernel_src" "$git_url"; do if [ -n "$given" ]; then sources=$((sources + 1)); fi; done
if [ "$sources" -gt 1 ]; then usage "give one of --kernel, --kernel-src and --kernel-git, not both"; fi
case "$el2_debug" in on|off) ;; *) usage "--el2-debug takes on or off, not '$el2_debug'" ;; esac
out=${out:-runs/nightly-${kernel:-6.12}-${cpu}-el2-debug-${el2_debug}-$(date +%Y%m%d-%H%M%S)}
if [ -e "$out/suites/result.json" ]; then usage "$out already holds a finished run; pick a new --out"; fi

cd "$here"
make setup
py=.venv/bin/python
harness=.venv/bin/pkvm-harness
cache=$($py -c 'from harness.paths import default_cache_dir; print(default_cache_dir())')

if [ -n "$git_url" ]; then
  # One shallow clone per URL, kept in the cache and fetched again each night.
  kernel_src="$cache/nightly-src/$(printf '%s' "$git_url" | sha256sum | cut -c1-16)"
  echo "nightly: fetching $git_url $git_ref into $kernel_src"
  mkdir -p "$kernel_src"
  git -C "$kernel_src" init -q
  git -C "$kernel_src" fetch -q --depth 1 "$git_url" "$git_ref"
  git -C "$kernel_src" checkout -q --force FETCH_HEAD
  git -C "$kernel_src" clean -q -ffdx
  echo "nightly: kernel at $(git -C "$kernel_src" rev-parse HEAD)"
fi
# The same option for the CLI (--kernel-src) and for the pytest plugin (--pkvm-kernel-src).
src_args=()
if [ -n "$kernel_src" ]; then src_args=(kernel-src "$kernel_src"); fi
if [ -n "$kernel" ]; then src_args=(kernel "$kernel"); fi
cli_src=() plugin_src=()
if [ "${#src_args[@]}" -gt 0 ]; then
  cli_src=("--${src_args[0]}" "${src_args[1]}")
  plugin_src=("--pkvm-${src_args[0]}" "${src_args[1]}")
fi

mkdir -p "$out"
# Built first and on its own, so a cold build shows its progress (plain lines in CI).
$harness build "${cli_src[@]}" --el2-debug "$el2_debug"

status=0
$py -m pytest test_suites -m "not slow" -p no:cacheprovider -v --pkvm-cpu "$cpu" --pkvm-el2-debug "$el2_debug" \
  --pkvm-el2-coverage \
  "${plugin_src[@]}" \
  --pkvm-run-dir "$out/suites" "$@" || status=$?

# The error paths, short forms (make test-slow has the full ones): a fault sweep of the first
# calls of a 1-vCPU lifecycle (each failed in turn, judged; a finding the kernel's code does not
# explain fails it), and the hostile-host suite on its test kernel (built once, cached).
keep_first_failure() { if [ "$status" -eq 0 ]; then status=$1; fi; }
$harness inject --sweep --limit 6 "${cli_src[@]}" --el2-debug "$el2_debug" --cpu "$cpu" --el2-plugin off -q \
  --runs-dir "$out/inject" || keep_first_failure $?
$py -m pytest test_suites/hostile -p no:cacheprovider -v --pkvm-cpu "$cpu" --pkvm-el2-debug "$el2_debug" \
  --pkvm-config pkvm-hostile-host "${plugin_src[@]}" --pkvm-run-dir "$out/hostile" || keep_first_failure $?

if [ -f "$out/suites/result.json" ]; then
  $harness report "$out/suites" -o "$out/report.md"
  $harness report "$out/suites" --format html -o "$out/report.html"
  if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then cat "$out/report.md" >> "$GITHUB_STEP_SUMMARY"; fi
else
  echo "nightly: the suites left no result.json in $out/suites (pytest exit $status)" >&2
fi
echo "nightly: cpu=$cpu el2-debug=$el2_debug results in $out (exit $status)"
exit "$status"
