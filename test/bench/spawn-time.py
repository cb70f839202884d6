#!/usr/bin/python3
# Times a command from fork/exec to exit, as a shell or a unit would start it (no Node on the parent's
# side). Prints {"samples": [ms]} as one JSON line. Usage: spawn-time.py [--until-output] N WARMUP COMMAND [ARG...]
# With --until-output, each sample ends at the command's first byte on stdout instead (for `tapbroker run
# -- echo`: when the command it runs has started); the exit is still awaited before the next sample.
import json
import subprocess
import sys
import time

args = sys.argv[1:]
until_output = args[0] == '--until-output'
if until_output:
    args = args[1:]
n, warmup, cmd = int(args[0]), int(args[1]), args[2:]
samples = []
for i in range(warmup + n):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if until_output else subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    if until_output:
        first = p.stdout.read(1)
        dt = (time.perf_counter() - t0) * 1000
        p.stdout.read()
    err = p.stderr.read()
    p.wait()
    if not until_output:
        dt = (time.perf_counter() - t0) * 1000
    if p.returncode != 0 or (until_output and not first):
        sys.stderr.write('%s exited %d: %s\n' % (cmd, p.returncode, err.decode(errors='replace')))
        sys.exit(1)
    if i >= warmup:
        samples.append(dt)
print(json.dumps({'samples': samples}))
