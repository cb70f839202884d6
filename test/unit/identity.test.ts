// The caller's identity as the broker reads it from /proc (identity.ts): trusted only where the caller's pidfd, read
// after, still names the pid it was read by.
import test from 'ava';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { sys } from '@tapbroker/protocol';
import { callerStartTime, processStartTime } from '@tapbroker/broker/internal';

// Found by an outside review: a macvtap holder's start time (what names it across restarts) was read by pid alone,
// so a pid reused between the connection and the grant would record the reuser. A pid whose pidfd names another
// process (here: this process's pid, a reaped child's pidfd, as a reuse would leave it) gives none.
test('a caller\'s start time is read only while its pidfd still names its pid', async (t) => {
  const self = sys.pidfdOpen(process.pid)!;
  const child = spawn('sleep', ['60']);
  const theirs = sys.pidfdOpen(child.pid!)!;
  try {
    const start = callerStartTime({ pid: process.pid, pidfd: self });
    t.not(start, null);
    t.is(start, processStartTime(process.pid));
    t.is(callerStartTime({ pid: process.pid, pidfd: null }), start, 'no pidfd (an older kernel): as before');
    t.is(callerStartTime({ pid: child.pid!, pidfd: theirs }), processStartTime(child.pid!), 'its own pidfd');
    child.kill('SIGKILL');
    await once(child, 'exit');
    // Reaped: the pidfd names no pid now, and the pid may be anyone's.
    t.is(callerStartTime({ pid: process.pid, pidfd: theirs }), null);
  } finally {
    child.kill('SIGKILL');
    sys.close(self);
    sys.close(theirs);
  }
});
