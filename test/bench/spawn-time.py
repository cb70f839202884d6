#!/usr/bin/python3
# Times a command from fork/exec to exit, as a shell or a unit would start it (no Node on the parent's
# side). Prints {"samples": [ms]} as one JSON line. Usage: spawn-time.py [--until-output] N WARMUP COMMAND [ARG...]
# With --until-output, each sample ends at the command's first byte on stdout instead (for `tapbroker run
# -- echo`: when the command it runs has started); the exit is still awaited before the next sample.
# With --settle, each sample starts only once the namespace has no more links than before the first one
# (/sys/class/net as `ip netns exec` mounts it): a run's taps, deleted by the kernel after its command exits,
# are gone before the next run makes its own, as the C floor's taps never are torn down while it measures.
import json
import os
import subprocess
import sys
import time

args = sys.argv[1:]
until_output = settle = False
while args[0].startswith('--'):
    until_output = until_output or args[0] == '--until-output'
    settle = settle or args[0] == '--settle'
    args = args[1:]
links = len(os.listdir('/sys/class/net'))


def settled():
    deadline = time.monotonic() + 30
    while len(os.listdir('/sys/class/net')) > links and time.monotonic() < deadline:
        time.sleep(0.005)


n, warmup, cmd = int(args[0]), int(args[1]), args[2:]
samples = []
for i in range(warmup + n):
    if settle:
        settled()
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
