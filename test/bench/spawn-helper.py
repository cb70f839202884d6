#!/usr/bin/python3
# Spawns a bridge helper the way qemu does: fork and exec from compiled code (here CPython's
# _posixsubprocess, as qemu's net_bridge_run_helper does in C), `--use-vnet --br=BR --fd=N` with N the
# child's end of a SOCK_STREAM socketpair, then recvmsg for the tap fd. Node's child_process is not on the
# measured path. Prints {"samples": [spawn → fd ms], "exits": [spawn → exit ms]} as one JSON line.
# Usage: spawn-helper.py HELPER BRIDGE N WARMUP
import json
import os
import socket
import subprocess
import sys
import time

helper, bridge, n, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
samples, exits = [], []
for i in range(warmup + n):
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    t0 = time.perf_counter()
    child = subprocess.Popen([helper, '--use-vnet', '--br=' + bridge, '--fd=%d' % theirs.fileno()],
                             pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    theirs.close()
    _, fds, _, _ = socket.recv_fds(mine, 1, 1)
    t1 = time.perf_counter()
    err = child.stderr.read()
    child.wait()
    t2 = time.perf_counter()
    mine.close()
    if len(fds) != 1:
        sys.stderr.write('%s sent no fd (exit %s): %s\n' % (helper, child.returncode, err.decode(errors='replace')))
        sys.exit(1)
    # The tap goes with its last fd: destroyed here, off the clock, before the next spawn.
    os.close(fds[0])
    if i >= warmup:
        samples.append((t1 - t0) * 1000)
        exits.append((t2 - t0) * 1000)
print(json.dumps({'samples': samples, 'exits': exits}))
