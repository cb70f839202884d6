// Leaving a command-line tool without losing output: a pipe takes 64 KiB at a time, and process.exit()
// drops whatever is still queued (`tapbroker list --json | jq`, `tapbrokerd check-policy --json`).

/** Exits with `code` once everything written to stdout and stderr has left. */
export function exitFlushed(code: number): void {
  let pending = 2;
  const done = () => {
    if (--pending === 0) process.exit(code);
  };
  process.stdout.write('', done);
  process.stderr.write('', done);
}
