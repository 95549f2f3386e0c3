#!/usr/bin/env bash
# Installs what capsa needs on Debian/Ubuntu: QEMU and friends from apt, capsa from this checkout.
#   bash scripts/install.sh          # the library and CLI
#   bash scripts/install.sh --dev    # plus test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86   # the VMM
  qemu-utils        # qemu-img: qcow2 overlays
  ovmf              # UEFI firmware for UefiBoot
  busybox-static    # guest userland
  cpio kmod         # test images, module dependency lookups
  binutils          # readelf/strip: guest images for other architectures
  e2fsprogs         # mke2fs: root file systems of OCI images
  systemd-boot-efi mtools dosfstools  # building a test ESP for the UEFI tests
)
if [ "${1:-}" = "--dev" ]; then
  APT_PACKAGES+=(git)  # the share tests commit to a repository inside a share
  # The OCI tests run a real registry and push to it.
  APT_PACKAGES+=(docker-registry skopeo apache2-utils)
  APT_PACKAGES+=(qemu-system-arm qemu-efi-aarch64)  # arm64 guests
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# arm64 guests use Debian's arm64 kernel and busybox (multi-arch apt downloads).
need_update=""
if [ "${1:-}" = "--dev" ] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  $SUDO dpkg --add-architecture arm64
  need_update=1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# The kernel package lists are needed to fetch capsa's default guest kernel, even when
# every package above is already present.
if [ ${#missing[@]} -gt 0 ] || [ -n "$need_update" ] \
    || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

extra=""
if [ "${1:-}" = "--dev" ]; then extra="[dev]"; fi
python3 -m pip install -q -e ".${extra}"
