#!/usr/bin/python3
# Times a command from fork/exec to exit, as a shell or a unit would start it (no Node on the parent's
# side). Prints {"samples": [ms]} as one JSON line. Usage: spawn-time.py N WARMUP COMMAND [ARG...]
import json
import subprocess
import sys
import time

n, warmup, cmd = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
samples = []
for i in range(warmup + n):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        sys.stderr.write('%s exited %d: %s\n' % (cmd, r.returncode, r.stderr.decode(errors='replace')))
        sys.exit(1)
    if i >= warmup:
        samples.append(dt)
print(json.dumps({'samples': samples}))
