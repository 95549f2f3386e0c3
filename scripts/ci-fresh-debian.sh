#!/usr/bin/env bash
# Runs the README's set-up commands, verbatim, as a new user would on a freshly installed
# Debian: a `debootstrap --variant=minbase` root with nothing added but python3, holding a
# copy of this checkout. Needs root and debootstrap (installed when missing).
#
#   bash scripts/ci-fresh-debian.sh trixie              # both README commands
#   bash scripts/ci-fresh-debian.sh trixie 1            # only the first (boot, run a command)
#   INSTALL_ARGS=--qemu-backports bash scripts/ci-fresh-debian.sh bookworm 1 -- tests/vm/test_qemu_versions.py
#
# INSTALL_ARGS are added to the README's `scripts/install.sh` call; test paths after `--`
# run once the commands are done (with the environment install.sh made). The root is made
# under /var/tmp/capsa-fresh-SUITE (the bare base is kept for the next run) and every mount
# and process in it is gone when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
suite=${1:?usage: ci-fresh-debian.sh SUITE [BLOCK...] [-- PYTEST ARGS]}
shift
blocks=() extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  blocks+=("$1"); shift
done
[ ${#blocks[@]} -gt 0 ] || blocks=(1 2)

base=/var/tmp/capsa-fresh-$suite.base
root=/var/tmp/capsa-fresh-$suite
say() { printf '=== fresh %s: %s\n' "$suite" "$*"; }

make_base() {
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  say "debootstrap --variant=minbase $suite"
  rm -rf "$base.tmp"
  debootstrap --variant=minbase "$suite" "$base.tmp" http://deb.debian.org/debian >/dev/null
  cp /etc/resolv.conf "$base.tmp/etc/resolv.conf"
  chroot "$base.tmp" apt-get install -y -qq --no-install-recommends python3 ca-certificates >/dev/null
  # These machines reach the package registries through a local certificate authority.
  mkdir -p "$base.tmp/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$base.tmp/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$base.tmp" update-ca-certificates >/dev/null 2>&1
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$base.tmp/etc/pip.conf"
  mv "$base.tmp" "$base"
}

teardown() {
  # Processes left in the root (none should be), then its mounts, then the root itself.
  for p in /proc/[0-9]*; do
    if [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ]; then kill -9 "${p#/proc/}" 2>/dev/null || true; fi
  done
  for m in dev/shm dev/pts dev proc sys; do umount -l "$root/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$root"
}

[ -x "$base/usr/bin/python3" ] || make_base
teardown
trap teardown EXIT
cp -a "$base" "$root"
mkdir -p "$root/root/capsa"
# The checkout as it is (tracked and new files, nothing ignored): in CI, a clean clone.
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$root/root/capsa"
mount --bind /dev "$root/dev"
mount -t devpts devpts "$root/dev/pts" 2>/dev/null || true
mount -t tmpfs tmpfs "$root/dev/shm"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"

# The README's set-up commands: the shell blocks of its "Set-up" section, in order.
readme_block() {
  python3 - "$1" <<'PY'
import re, sys
text = open("README.md").read()
section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
print(blocks[int(sys.argv[1]) - 1].strip())
PY
}

in_root() {
  chroot "$root" env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash -c "cd /root/capsa && $1"
}

say "$(chroot "$root" sh -c '. /etc/os-release; echo $PRETTY_NAME'), $(chroot "$root" python3 -V)"
status=0
for n in "${blocks[@]}"; do
  cmd=$(readme_block "$n")
  if [ -n "${INSTALL_ARGS:-}" ]; then
    cmd=${cmd//scripts\/install.sh/scripts\/install.sh $INSTALL_ARGS}
  fi
  say "README command $n: $cmd"
  start=$(date +%s)
  if in_root "$cmd"; then rc=0; else rc=$?; status=1; fi
  say "README command $n: exit $rc after $(( $(date +%s) - start )) s"
done
if [ ${#extra[@]} -gt 0 ]; then
  say "pytest ${extra[*]}"
  in_root "/opt/capsa/bin/python -m pytest -q -p no:cacheprovider ${extra[*]}" || status=1
fi
say "capsa doctor"
in_root "capsa doctor" || status=1
exit $status
