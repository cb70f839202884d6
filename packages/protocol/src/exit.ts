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
export function dropUnwritableOutput(): { lost: () => boolean } {
  let lost = false;
  for (const stream of [process.stdout, process.stderr]) stream.on('error', () => (lost = true));
  return { lost: () => lost };
}

/** Exit status 74 (EX_IOERR, sysexits.h): output was lost. */
export const EX_IOERR = 74;

/**
 * Exits with `code` once everything written to stdout and stderr has left; a success whose output could not be
 * written all is EX_IOERR instead, where `lost` is given (a tool's result is its output: `list > /dev/full`).
 */
export function exitFlushed(code: number, lost?: () => boolean): void {
  let pending = 2;
  let failed = false;
  const done = (err?: Error | null) => {
    failed ||= !!err;
    // After this turn: a failed write's 'error' event comes on the next tick.
    if (--pending === 0) setImmediate(() => process.exit(code === 0 && lost && (failed || lost()) ? EX_IOERR : code));
  };
  process.stdout.write('', done);
  process.stderr.write('', done);
}
