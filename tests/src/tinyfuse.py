"""A FUSE file system of one executable file, speaking the kernel's protocol on /dev/fuse
directly (no libfuse), for the agent's tests.

    tinyfuse.py MOUNTPOINT SOURCE UID [--allow-other] [--hang-uid N]

Mounts a directory holding `prog`, a copy of SOURCE owned by UID. Without --allow-other only
UID may reach it (root is refused, as the kernel does for a user's own FUSE mount). With
--hang-uid N, opens and reads asked by user N are never answered: a daemon that hangs. Prints
`mounted` once the mount is up, and serves until killed.
"""

import ctypes
import os
import struct
import sys

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
LOOKUP, FORGET, GETATTR, OPEN, READ, STATFS, RELEASE = 1, 2, 3, 14, 15, 17, 18
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, ACCESS = 25, 26, 27, 28, 29, 34
INTERRUPT, DESTROY, BATCH_FORGET = 36, 38, 42
ENOENT, ENOSYS = 2, 38
ROOT, PROG = 1, 2
VALID = 3600


def attr(node, size, uid, gid):
    if node == ROOT:
        return ATTR.pack(ROOT, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, uid, gid, 0, 4096, 0)
    blocks = (size + 511) // 512
    return ATTR.pack(PROG, size, blocks, 0, 0, 0, 0, 0, 0, 0o100755, 1, uid, gid, 0, 4096, 0)


def main():
    mountpoint, source, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    allow_other = "--allow-other" in sys.argv
    hang_uid = None
    if "--hang-uid" in sys.argv:
        hang_uid = int(sys.argv[sys.argv.index("--hang-uid") + 1])
    with open(source, "rb") as f:
        data = f.read()
    fd = os.open("/dev/fuse", os.O_RDWR)
    opts = f"fd={fd},rootmode=40000,user_id={uid},group_id={uid}"
    if allow_other:
        opts += ",allow_other"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tinyfuse", mountpoint.encode(), b"fuse", 0, opts.encode()) != 0:
        err = ctypes.get_errno()
        sys.exit(f"tinyfuse: cannot mount {mountpoint}: {os.strerror(err)}")

    def reply(unique, payload=b"", error=0):
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique) + payload)

    print("mounted", flush=True)
    while True:
        try:
            msg = os.read(fd, 1 << 21)
        except OSError:
            return
        if len(msg) < IN_HEADER.size:
            return
        _, op, unique, node, who, _, _, _, _ = IN_HEADER.unpack_from(msg)
        body = msg[IN_HEADER.size:]
        if op == INIT:
            major, minor, readahead, _ = struct.unpack_from("<IIII", body)
            reply(unique, struct.pack("<IIIIHHIIHH8I", 7, 31, readahead, 0, 16, 12, 65536, 1,
                                      32, 0, *([0] * 8)))
        elif op in (FORGET, BATCH_FORGET, INTERRUPT):
            pass  # no answer is expected
        elif op == LOOKUP:
            name = body.split(b"\0", 1)[0]
            if node == ROOT and name == b"prog":
                entry = struct.pack("<QQQQII", PROG, 0, VALID, VALID, 0, 0)
                reply(unique, entry + attr(PROG, len(data), uid, uid))
            else:
                reply(unique, error=ENOENT)
        elif op == GETATTR:
            reply(unique, struct.pack("<QII", VALID, 0, 0) + attr(node, len(data), uid, uid))
        elif op in (OPEN, READ) and who == hang_uid:
            pass  # never answered
        elif op in (OPEN, OPENDIR):
            reply(unique, struct.pack("<QII", 0, 0, 0))
        elif op == READ:
            _, offset, size, _ = struct.unpack_from("<QQII", body)
            reply(unique, data[offset:offset + size])
        elif op == READDIR:
            reply(unique)
        elif op == STATFS:
            reply(unique, struct.pack("<QQQQQIIII6I", 0, 0, 0, 0, 0, 4096, 255, 4096, 0,
                                      *([0] * 6)))
        elif op in (RELEASE, RELEASEDIR, FLUSH, ACCESS):
            reply(unique)
        elif op == DESTROY:
            reply(unique)
            return
        else:
            reply(unique, error=ENOSYS)


if __name__ == "__main__":
    main()
