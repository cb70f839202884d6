#!/usr/bin/env python3
# Queues N connections at the broker's listening socket while the broker is stopped (SIGSTOP), each carrying
# one fd in its first packet: a pipe's end, or, in the last LAST of them, a TCP socket whose last close lingers
# (SO_LINGER 30 s, unsent data, a peer that never reads). Connections the broker has not accepted yet live in
# its listening socket: whoever closes that last releases them, and the lingering socket with them. Prints
# `queued N`, then holds its sockets until killed.
#   backlog.py SOCKET N LAST
import array, os, socket, struct, sys, time

sockpath, n, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
LIST = bytes([0x82, 0xa2]) + b'op' + bytes([0xa4]) + b'list' + bytes([0xa2]) + b'id' + bytes([2])
listener = socket.socket()
listener.bind(('127.0.0.1', 0))
listener.listen(8)
tcp = socket.socket()
tcp.connect(listener.getsockname())
tcp.setblocking(False)
try:
    while True:
        tcp.send(b'a' * 65536)
except BlockingIOError:
    pass
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 30))
rp, _wp = os.pipe()
conns = []
for i in range(n):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        c.connect(sockpath)
        fd = tcp.fileno() if i >= n - last else rp
        c.sendmsg([LIST], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [fd]))])
    except OSError:
        c.close()
        break
    conns.append(c)
tcp.close()
print(f'queued {len(conns)}', flush=True)
time.sleep(10 ** 6)
