#!/usr/bin/env bash
# Installs capsa on Debian/Ubuntu: QEMU and friends from apt, capsa into its own virtual
# environment made with the system Python (which PEP 668 keeps pip away from), and a
# `capsa` command on the PATH. Running it again upgrades in place.
#
#   bash scripts/install.sh                   # the library and CLI
#   bash scripts/install.sh --dev             # plus test and lint tools (editable install)
#   bash scripts/install.sh --qemu-backports  # Debian 12: QEMU 10 from bookworm-backports
#
# Where it goes: as root /opt/capsa (command: /usr/local/bin/capsa); as a user
# ~/.local/share/capsa/venv (command: ~/.local/bin/capsa). CAPSA_VENV chooses another
# place, CAPSA_PYTHON another interpreter (default: /usr/bin/python3).
set -euo pipefail
cd "$(dirname "$0")/.."

dev="" backports=""
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --qemu-backports) backports=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'capsa install: %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install.sh: run as root, or install sudo" >&2; exit 1; }
  SUDO="sudo"
fi

. /etc/os-release
codename="${VERSION_CODENAME:-}"

APT_PACKAGES=(
  python3 python3-venv  # capsa's own environment, made with the system Python
  qemu-system-x86   # the VMM
  qemu-utils        # qemu-img: qcow2 overlays
  ovmf              # UEFI firmware for UefiBoot
  busybox-static    # guest userland
  cpio              # the initramfs unit test unpacks with GNU cpio
  binutils          # readelf/strip: guest images for other architectures
  e2fsprogs         # mke2fs: root file systems of OCI images
  mmdebstrap genext2fs  # the default sandbox userland, a Debian root built locally
  zstd              # kernels whose modules are zstd-compressed
  systemd-boot-efi mtools dosfstools  # building a test ESP for the UEFI tests
)
QEMU_PACKAGES=(qemu-system-x86 qemu-utils)
if [ -n "$dev" ]; then
  APT_PACKAGES+=(git)  # the share tests commit to a repository inside a share
  APT_PACKAGES+=(iproute2)  # network tests put listeners in network namespaces
  # The OCI tests run a real registry and push to it.
  APT_PACKAGES+=(docker-registry skopeo apache2-utils)
  APT_PACKAGES+=(qemu-system-arm qemu-efi-aarch64)  # arm64 guests
  QEMU_PACKAGES+=(qemu-system-arm)
fi

need_update=""
# arm64 guests use Debian's arm64 kernel and busybox (multi-arch apt downloads).
if [ -n "$dev" ] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  $SUDO dpkg --add-architecture arm64
  need_update=1
fi

# QEMU 10 on Debian 12 (snapshots of VMs with shares or vsock need QEMU 8.2 or newer).
backports_suite=""
if [ -n "$backports" ]; then
  if [ "$codename" = "bookworm" ]; then
    backports_suite="bookworm-backports"
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      say "adding $backports_suite to apt's sources"
      echo "deb http://deb.debian.org/debian bookworm-backports main" \
        | $SUDO tee /etc/apt/sources.list.d/capsa-bookworm-backports.list >/dev/null
      need_update=1
    fi
  else
    say "--qemu-backports is for Debian 12 (bookworm); ${PRETTY_NAME:-this system} keeps its own QEMU"
  fi
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# The kernel package lists are needed to fetch capsa's default guest kernel, even when
# every package above is already present.
if [ ${#missing[@]} -gt 0 ] || [ -n "$need_update" ] || [ -n "$backports_suite" ] \
    || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi
export DEBIAN_FRONTEND=noninteractive
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ -n "$backports_suite" ]; then
  say "installing QEMU from $backports_suite"
  $SUDO apt-get install -y -qq --no-install-recommends -t "$backports_suite" \
    "${QEMU_PACKAGES[@]}" >/dev/null
fi

# The environment: made once, with the system Python; made again if that Python changed
# under it (a distribution upgrade leaves a venv pointing at an interpreter that is gone).
python="${CAPSA_PYTHON:-/usr/bin/python3}"
if [ "$(id -u)" -eq 0 ]; then
  venv="${CAPSA_VENV:-/opt/capsa}"
  bindir="/usr/local/bin"
else
  venv="${CAPSA_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/capsa/venv}"
  bindir="$HOME/.local/bin"
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: capsa needs Python 3.11 or newer; $python is $("$python" -V 2>&1)" >&2
  exit 1
fi
if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
  say "$venv no longer runs (its Python changed): making it again"
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  say "making the environment $venv with $("$python" -V 2>&1)"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi

if [ -n "$dev" ]; then
  say "installing capsa (editable, with test tools) into $venv"
  "$venv/bin/python" -m pip install -q --upgrade -e ".[dev,ray]"
else
  say "installing capsa into $venv"
  "$venv/bin/python" -m pip install -q --upgrade .
fi

mkdir -p "$bindir"
ln -sfn "$venv/bin/capsa" "$bindir/capsa"
case ":$PATH:" in
  *":$bindir:"*) say "the capsa command is $bindir/capsa" ;;
  *)
    say "$bindir is not on your PATH: add it (e.g. in ~/.profile), or run $bindir/capsa"
    if [ -n "$SUDO" ] && { [ ! -e /usr/local/bin/capsa ] || [ -L /usr/local/bin/capsa ]; }; then
      $SUDO ln -sfn "$venv/bin/capsa" /usr/local/bin/capsa
      say "meanwhile /usr/local/bin/capsa points at it"
    fi
    ;;
esac
