#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks drive for real: Chromium (browser test), Podman + runc +
# debootstrap (container test), wrk (make bench), HAProxy (the rolling update), the DejaVu fonts (training's
# non-digit images).
# Skips what is present; needs root (or passwordless sudo) for what is missing.
set -euo pipefail
# kubectl renders deploy/k8s (tests/test_deploy.py); one already on PATH is kept, else Debian's kubernetes-client.
declare -A need=([wrk]=wrk [chromium]=chromium [podman]=podman [runc]=runc [debootstrap]=debootstrap [npm]=npm
  [kubectl]=kubernetes-client)
missing=()
for bin in "${!need[@]}"; do command -v "$bin" >/dev/null 2>&1 || missing+=("${need[$bin]}"); done
# The DejaVu faces training/outliers.py renders its non-digit letters with (training and held-out sets).
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf ] || missing+=(fonts-dejavu-core)
# HAProxy (benchmarks/rollout.py) lives in /usr/sbin, which a user's PATH may not name.
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "missing system packages: ${missing[*]} (run as root: apt-get install ${missing[*]})" >&2; exit 1
  fi
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${missing[@]}" >/dev/null
