// Leaving a command-line tool without losing output: a pipe takes 64 KiB at a time, and process.exit()
// drops whatever is still queued (`tapbroker list --json | jq`, `tapbrokerd check-policy --json`). And
// keeping Node's debugger shut.

/**
 * Node opens its inspector on SIGUSR1: a debugger on 127.0.0.1:9229 that any local user may connect to and
 * run code in, as this process's user (root, for the broker). Anyone who may signal the process could open
 * it: qemu, a child of `tapbroker run`, can signal its parent. A listener takes the signal instead (Node 20
 * has no --disable-sigusr1); `onSignal` is what it does then (nothing, by default). Call it first thing.
 */
export function keepInspectorShut(onSignal: () => void = () => {}): void {
  process.on('SIGUSR1', onSignal);
}

/**
 * Output that cannot be written (a full disk, a log pipe whose reader died) is dropped: it must never end the
 * process, which may hold a VM's devices and be the only one to pass signals on to it. Node reports a failed
 * write as an `'error'` event, which unhandled ends the process. Call it first thing.
 */
export function dropUnwritableOutput(): void {
  for (const stream of [process.stdout, process.stderr]) stream.on('error', () => {});
}

/** Exits with `code` once everything written to stdout and stderr has left. */
export function exitFlushed(code: number): void {
  let pending = 2;
  const done = () => {
    if (--pending === 0) process.exit(code);
  };
  process.stdout.write('', done);
  process.stderr.write('', done);
}
