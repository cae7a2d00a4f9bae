#!/usr/bin/env bash
# Runs a command with TMPDIR on a file system made for it (ext4 in a loop image, removed after),
# so that a benchmark that creates files (file-latency's burst) does not time what earlier runs
# left behind: on a file system that has created and deleted many files, ext4 looks longer for
# a free inode, and one writer thread created 10,000 files in 4 s here where a new file system
# took 0.5 s. Needs root (mount).
#
#   tests/bench/on_fresh_ext4.sh target/release/file-latency --files 10000 --scan-files 3000 \
#       --steady 300 --rate 30 --rules ../shared/data/signature-base/yara
#
# Environment: SIZE (the image's size, default 8G), IMAGE_DIR (where the image is kept while
# the command runs, default /var/tmp).
set -euo pipefail
[ "$#" -ge 1 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: mounting a loop image needs root" >&2; exit 2; }
image=$(mktemp "${IMAGE_DIR:-/var/tmp}/vedette-bench-XXXXXX.img")
mnt=$(mktemp -d /tmp/vedette-bench-mnt-XXXXXX)
cleanup() { umount "$mnt" 2>/dev/null || true; rmdir "$mnt"; rm -f "$image"; }
trap cleanup EXIT
truncate -s "${SIZE:-8G}" "$image"
mkfs.ext4 -q -F "$image"
mount -o loop "$image" "$mnt"
TMPDIR="$mnt" "$@"
