#!/usr/bin/env bash
# Debian packages the demo and the tests use: real printers (ippeveprinter, ipptool), CUPS, avahi/D-Bus
# for DNS-SD, Prometheus (promtool), websockify (benchmark baseline), iproute2 (network namespaces),
# PostgreSQL (the scale-out store; tests run a private server), and podman with buildah, runc and mmdebstrap
# (the image test builds a base image from the Debian archive and the Containerfile on it, and runs both
# programs from it), and for the portal's tests headless Chromium with its WebDriver and Node.js with npm
# (they install and run a real OpenID Connect provider, npm oidc-provider), and systemd's own verifier for the
# connector's unit (systemd-analyze), and net-snmp's agent (snmpd), which answers as a printer's Printer MIB
# in the tests of RAW and LPD printers' state.
set -euo pipefail
PACKAGES=(cups-ipp-utils cups cups-client avahi-daemon dbus prometheus websockify iproute2 postgresql
          podman buildah runc mmdebstrap chromium chromium-driver nodejs npm systemd snmpd)

missing=()
for pkg in "${PACKAGES[@]}"; do
  # A Node.js build that bundles npm (it provides and conflicts with Debian's npm) counts as npm.
  if [ "$pkg" = npm ] && command -v npm >/dev/null; then continue; fi
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "printrelay: these Debian packages are needed: ${missing[*]}" >&2
  echo "  run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi
# Installing cups, prometheus or snmpd would start their system services; tests run private instances instead.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
