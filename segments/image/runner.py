"""The guest side of a job owner's own program: the ``run`` workload's /init and its disks.

Theory of operation
-------------------
A job's guest boots the swarm's kernel with Gleaner's initramfs (recipe
``deploy/recipes/run.toml``, workload ``run``). Its ``/init`` (``RUN_INIT``)
finds four virtio disks, in this order:

========  ====  =========================================================
``vda``   rw    scratch: the job's root file system, made here at first boot
``vdb``   ro    the image: a header block, then each layer's tar at a
                block-aligned offset (``image_disk_header``); or a header
                saying the scratch disk already holds a root (disk images)
``vdc``   ro    the job: a tar of ``job/run.sh`` (the command, env and
                working folder, written by the host) and ``in/`` (inputs)
``vdd``   rw    outputs: the guest writes a tar of /gleaner/out here
========  ====  =========================================================

At first boot ``/init`` makes an ext2 file system on the scratch disk and
unpacks the layers into it, lowest first, applying whiteouts (``.wh.NAME``
deletes NAME, ``.wh..wh..opq`` empties its folder before the layer's own
files land); then it unpacks the job tar into ``/gleaner``. A marker file
makes this happen once: a checkpointed guest restored elsewhere carries its
scratch disk along and goes on where it was. The unpacking happens in the
guest, so a layer's links and names are only ever resolved in the guest's
own root; the host checked them at import all the same (``layers.py``).

It then mounts /proc, /sys and /dev in the new root, binds its own /bin at
``/.gleaner-bin`` there and runs ``job/run.sh``, which ``exec``s ``env -i
ENV… chroot /newroot /.gleaner-bin/sh -c 'cd DIR; exec "$@"' ARGV…``: the
working folder is entered inside the new root (busybox's chroot goes to
``/``), with a shell that works whether or not the image has one. The
program's stdout and stderr go to the console, which is the serial log the
host keeps. After it exits ``/init`` prints

    gleaner-exit STATUS
    gleaner-outputs BYTES        (or gleaner-warning outputs not written)

writes the outputs to ``vdd``, syncs and powers off. ``parse_exit`` reads the
status back from the console. The user, resource limits and a network are
not applied yet (the guest runs the program as its root user).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

SANS_IO = True

BLOCK = 16384  # layer offsets on the image disk, and the header's size
IMAGE_MAGIC = "gleaner-layers 1"
ROOT_MAGIC = "gleaner-root 1"
EXIT = re.compile(r"^gleaner-exit (\d{1,3})\r?$", re.MULTILINE)
MAX_LAYERS = 127
TOOLS = "/.gleaner-bin"  # the initramfs's /bin, bound into the job's root for run.sh

RUN_APPLETS = (
    "cat",
    "chroot",
    "dd",
    "dmesg",
    "echo",
    "env",
    "head",
    "hostname",
    "insmod",
    "ip",
    "ls",
    "mkdir",
    "mke2fs",
    "mount",
    "poweroff",
    "printf",
    "rm",
    "sh",
    "sleep",
    "sync",
    "tar",
    "touch",
    "tr",
    "umount",
    "wc",
)

RUN_INIT = r"""#!/bin/sh
# Gleaner guest /init: run a job owner's program (see segments/image/runner.py).
export PATH=/bin
set -f
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1
. /etc/gleaner.conf
hostname "${g_hostname:-gleaner}"
for m in $g_modules; do
  insmod "/lib/modules/$m.ko" 2>/dev/null || echo "gleaner-warning insmod $m failed"
done
n=0
while [ ! -e /dev/vdd ] && [ "$n" -lt 20 ]; do sleep 1; n=$((n+1)); done
[ -e /dev/vdd ] || { echo "gleaner-error the job's disks are missing"; poweroff -f; }
mkdir -p /newroot
dd if=/dev/vdb bs=16384 count=1 2>/dev/null > /run/header
IFS= read -r magic < /run/header
if [ "$magic" = "gleaner-root 1" ]; then  # a disk image: its root, never formatted
  mount -t ext4 /dev/vda /newroot 2>/dev/null || mount -t ext4 /dev/vda1 /newroot \
    || { echo "gleaner-error the image's disk does not mount"; poweroff -f; }
elif ! mount -t ext4 /dev/vda /newroot 2>/dev/null; then
  # format only a blank scratch disk: anything else is a file system this kernel refused
  [ "$(dd if=/dev/vda bs=65536 count=1 2>/dev/null | tr -d '\000' | wc -c)" -eq 0 ] \
    && mke2fs /dev/vda >/dev/null 2>&1 && mount -t ext4 /dev/vda /newroot \
    || { echo "gleaner-error cannot make the scratch file system"; poweroff -f; }
fi
if [ ! -e /newroot/.gleaner-unpacked ]; then
  if [ "$magic" = "gleaner-layers 1" ]; then
    tail_lines() { while IFS= read -r line; do [ -n "$line" ] || break; echo "$line"; done; }
    { IFS= read -r _; tail_lines; } < /run/header > /run/layers
    while read -r offset size; do
      skip=$((offset / 16384)); count=$(((size + 16383) / 16384))
      dd if=/dev/vdb bs=16384 skip="$skip" count="$count" 2>/dev/null | tar -t > /run/members
      while IFS= read -r member; do
        member=${member#./}; base=${member##*/}; dir=${member%/*}
        [ "$dir" = "$member" ] && dir=.
        case "$base" in
          .wh..wh..opq) (set +f; cd "/newroot/$dir" 2>/dev/null && rm -rf -- * .[!.]* ..?*) ;;
          .wh.*) rm -rf "/newroot/$dir/${base#.wh.}" ;;
        esac
      done < /run/members
      dd if=/dev/vdb bs=16384 skip="$skip" count="$count" 2>/dev/null | tar -x -C /newroot \
        || echo "gleaner-warning a layer did not unpack whole"
      while IFS= read -r member; do
        member=${member#./}
        case "${member##*/}" in .wh.*) rm -f "/newroot/$member" ;; esac
      done < /run/members
    done < /run/layers
  elif [ "$magic" != "gleaner-root 1" ]; then
    echo "gleaner-error the image disk has no header"; poweroff -f
  fi
  mkdir -p /newroot/gleaner/out /newroot/proc /newroot/sys /newroot/dev
  tar -x -C /newroot/gleaner -f /dev/vdc || echo "gleaner-warning the job tar did not unpack"
  touch /newroot/.gleaner-unpacked
  sync
fi
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/.gleaner-bin && mount -o bind /bin /newroot/.gleaner-bin
echo "gleaner-run-start"
sh /newroot/gleaner/job/run.sh
status=$?
echo "gleaner-exit $status"
umount /newroot/proc /newroot/sys /newroot/dev /newroot/.gleaner-bin 2>/dev/null
if tar -c -f /dev/vdd -C /newroot/gleaner/out . 2>/dev/null; then
  echo "gleaner-outputs written"
else
  echo "gleaner-warning outputs not written (over the output disk?)"
fi
sync
umount /newroot 2>/dev/null
sync
poweroff -f
"""


def image_disk_header(layers: Sequence[tuple[int, int]]) -> bytes:
    """The image disk's first block: the magic, then ``OFFSET SIZE`` per layer, lowest first."""
    if not 0 < len(layers) <= MAX_LAYERS:
        raise ValueError(f"an image disk holds 1 to {MAX_LAYERS} layers, not {len(layers)}")
    lines = [IMAGE_MAGIC, *(f"{offset} {size}" for offset, size in layers), ""]
    text = "\n".join(lines).encode() + b"\n"
    if any(offset % BLOCK for offset, _ in layers):
        raise ValueError("layer offsets must be block-aligned")
    return text.ljust(BLOCK, b"\x00")


def root_disk_header() -> bytes:
    """The image disk of a disk image: its scratch disk already holds the root."""
    return (ROOT_MAGIC + "\n\n").encode().ljust(BLOCK, b"\x00")


def layer_offsets(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Block-aligned (offset, size) for layers of `sizes`, after the header block."""
    placed, offset = [], BLOCK
    for size in sizes:
        placed.append((offset, size))
        offset += -(-size // BLOCK) * BLOCK
    return placed


# Runs in the job's root, as TOOLS/sh: enter the folder, then exec the program by the
# image's PATH (busybox's shell would run its own applet for a bare "ls" or "awk").
LAUNCH = (
    'set -f; cd "$1" || exit 126; shift; '
    'case "$1" in */*) exec "$@" ;; esac; '
    "IFS=:; for dir in ${PATH:-/usr/local/bin:/usr/bin:/bin}; do "
    'if [ -f "$dir/$1" ] && [ -x "$dir/$1" ]; then program="$dir/$1"; shift; '
    'exec "$program" "$@"; fi; done; '
    'echo "gleaner: $1: not found in PATH" >&2; exit 127'
)


def run_script(argv: Sequence[str], env: Sequence[str], working_dir: str) -> str:
    """``job/run.sh``: change into the working folder and run `argv` with only `env`."""
    if not argv:
        raise ValueError("the job has no command (no entrypoint, no cmd)")
    folder = working_dir or "/"
    if not folder.startswith("/"):
        raise ValueError(f"the working folder {folder!r} is not absolute")
    words = [
        *("exec", "env", "-i", *env, "chroot", "/newroot"),
        *(f"{TOOLS}/sh", "-c", LAUNCH, "gleaner-run", folder),
        *argv,
    ]
    return " ".join(shlex.quote(word) for word in words) + "\n"


def parse_exit(console: str) -> int | None:
    """The program's exit status from the console, or None if it never exited."""
    found = EXIT.findall(console)
    return int(found[-1]) if found else None
