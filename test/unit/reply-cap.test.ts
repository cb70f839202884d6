// The reply cap (session.ts): a reply over MAX_REPLY_BYTES is a broker bug, answered as TB_E_INTERNAL and said on
// stderr, not sent (the client would refuse it) nor left as a closed connection. Every reply the handlers build is
// bounded (`list`, `status`), so no request makes one for real: this is the one fault here played by a stand-in for
// the broker's handlers (`dispatch`); the session, its socket and the codec are the real ones.
import test from 'ava';
import { MAX_REPLY_BYTES, SeqpacketConnection, encodeFrame, decodeReply, sys } from '@tapbroker/protocol';
import { Fairness, Session, type SessionHost } from '@tapbroker/broker/internal';

function leases(n: number) {
  return Array.from({ length: n }, (_, i) => ({
    id: `lease${i}`.padEnd(32, 'x'), uid: 65534, user: 'nobody', kind: 'tap' as const, name: `tb${i}`, ifindex: i + 1,
    parent: 'br0', network: null, mode: null, mac: '52:54:00:00:00:01', locked: false, queues: 1, rule: 'r'.repeat(128),
    created: new Date(0).toISOString(), ends: 'holder' as const, holder: 1,
  }));
}

test('a reply over the cap is answered as TB_E_INTERNAL, and the connection serves on', async (t) => {
  const [mine, theirs] = sys.socketpair(sys.SOCK_SEQPACKET);
  sys.fcntlSet(mine, sys.F_SETFL, sys.fcntlGet(mine, sys.F_GETFL) | sys.O_NONBLOCK);
  const conn = new SeqpacketConnection(mine, { maxPacket: 8192, takesFds: false });
  const huge = leases(1000);
  const host: SessionHost = {
    helloTimeoutMs: 5000,
    idleTimeoutMs: 5000,
    dispatch: (_caller, req) => ({
      reply: req.op === 'hello'
        ? { op: 'hello', id: req.id, version: req.version, broker: 'test' }
        : { op: 'list', id: req.id, leases: req.id === 2 ? huge : huge.slice(0, 1), truncated: false },
      fds: [],
    }),
    release: () => {},
    foreign: () => {},
    endLease: () => {},
    holds: () => false,
    refused: () => {},
    fairness: new Fairness(),
  };
  t.true(encodeFrame({ op: 'list', id: 2, leases: huge, truncated: false }).length > MAX_REPLY_BYTES, 'over the cap');
  const session = new Session(host, conn, { uid: 65534, gid: 65534, pid: 1, pidfd: null, groups: [] } as never);
  const running = session.run();
  const rx = new sys.Receiver(MAX_REPLY_BYTES + 4096);
  const ask = async (req: Record<string, unknown>) => {
    sys.sendMsg(theirs, { data: encodeFrame(req as never) }, sys.MSG_NOSIGNAL);
    for (let i = 0; i < 500; i++) {
      const m = rx.recv(theirs, sys.MSG_DONTWAIT);
      if (m) return decodeReply(m.data);
      await new Promise((r) => setTimeout(r, 10));
    }
    throw new Error('no reply');
  };
  try {
    await ask({ op: 'hello', id: 1, version: 2 });
    const over = await ask({ op: 'list', id: 2 });
    t.like(over, { op: 'error', id: 2, code: 'TB_E_INTERNAL', message: 'the reply was too large' });
    const next = await ask({ op: 'list', id: 3 });
    t.like(next, { op: 'list', id: 3 }, 'the next request is answered');
    t.false(session.closed);
  } finally {
    sys.close(theirs);
    await running;
  }
});
