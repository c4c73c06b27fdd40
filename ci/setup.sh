#!/usr/bin/env bash
# Idempotent machine set-up for the pKVM harness on Debian 12 (bookworm).
# Used by `make run`, `make test`, CI and the Vagrantfile, so every place installs the same things.
# Usage: ci/setup.sh [--venv DIR] [--test-tools | --python-only]   (as root, or with sudo available)
#   --test-tools   also what the harness's own tests use (ci/debian-test-packages.txt: a browser
#                  for the HTML report, Ruby for the Vagrantfile); `make test` passes it
#   --python-only  only the Python environment (rendering reports needs nothing else)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv="${here}/.venv"
lists=("${here}/ci/debian-packages.txt")
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv=${2:?--venv needs a directory}; shift 2 ;;
    --test-tools) lists+=("${here}/ci/debian-test-packages.txt"); shift ;;
    --python-only) lists=(); shift ;;
    *) echo "ci/setup.sh: unknown argument '$1' (see its usage line)" >&2; exit 2 ;;
  esac
done

# Debian packages the harness needs on the host: one list, shared with `pkvm-harness doctor`.
host_pkgs=(python3-venv)
if [ "${#lists[@]}" -gt 0 ]; then
  mapfile -t host_pkgs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "${lists[@]}" | awk '{print $1}')
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for p in "${host_pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

# arm64 user space (busybox-static:arm64 and later dropbear) is fetched with `apt-get download`,
# which needs the foreign architecture enabled.
need_update=0
if [ "${#lists[@]}" -gt 0 ] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup: enabling the arm64 architecture for arm64 user-space packages"
  as_root dpkg --add-architecture arm64
  need_update=1
fi
if [ "${#missing[@]}" -gt 0 ] || [ "$need_update" = 1 ] \
   || { [ "${#lists[@]}" -gt 0 ] && ! apt-cache show busybox-static:arm64 >/dev/null 2>&1; }; then
  echo "setup: apt-get update"
  as_root apt-get update -q
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: Debian packages present"
fi

# QEMU 10 from bookworm-backports: its TCG plugins read registers and guest memory, which the
# always-on EL2 tracer needs (docs/tracing.md). Only qemu-system-arm (and what it depends on)
# is taken from backports: `-t` on this one install, with the suite added to the system's own
# sources (so the one `apt-get update` refreshes every suite together).
min_qemu="1:10.0"
if [ "${#lists[@]}" -gt 0 ] && ! dpkg --compare-versions \
     "$(dpkg-query -W -f='${Version}' qemu-system-arm 2>/dev/null || echo 0)" ge "$min_qemu"; then
  bpo=/etc/apt/sources.list.d/pkvm-harness-bookworm-backports.sources
  if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "setup: adding bookworm-backports to the apt sources ($bpo)"
    printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' | as_root tee "$bpo" >/dev/null
  fi
  as_root apt-get update -q
  echo "setup: installing qemu-system-arm from bookworm-backports"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -t bookworm-backports qemu-system-arm
fi

# Python virtual environment with pinned dependencies; re-installed only when the pins change.
stamp="${venv}/.requirements.sha256"
want=$(cat "${here}/requirements.lock" "${here}/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -x "${venv}/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating the Python environment in ${venv}"
  python3 -m venv "$venv"
  "${venv}/bin/pip" install -q --upgrade pip
  "${venv}/bin/pip" install -q -r "${here}/requirements.lock"
  "${venv}/bin/pip" install -q --no-deps -e "$here"
  echo "$want" > "$stamp"
else
  echo "setup: Python environment up to date"
fi

# el2trace, the EL2 TCG plugin: built once into the cache for this QEMU (its header is fetched
# from Debian's qemu source package the first time, about 40 MB; docs/el2trace.md).
if [ "${#lists[@]}" -gt 0 ]; then
  "${venv}/bin/python" -m harness.el2.tcg.build
fi
