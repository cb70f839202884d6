// A fake broker for the client's own defences: it listens at argv[2] (mode 0666), answers hello, and
// answers create-tap with a socketpair end for a "tap" and, in `escape` mode, a message full of terminal
// escapes. Prints "ready" once listening.
import { PROTOCOL_VERSION, SeqpacketConnection, SeqpacketListener, decodeRequest, encodeFrame, sys } from '@tapbroker/protocol';

// `old`: a broker of another version within protocol 2, as one not restarted after an upgrade answers: a status
// reply without a field this client's has, and `unknown field` for one it added to a request.
const [socket, mode] = process.argv.slice(2) as [string, 'socket' | 'escape' | 'old'];
const listener = SeqpacketListener.listen(socket, { mode: 0o666 });
listener.start((fd) => {
  const conn = new SeqpacketConnection(fd, { maxPacket: 4096 });
  void (async () => {
    for (;;) {
      const p = await conn.receive();
      if (!p) return conn.close();
      const d = decodeRequest(p.data);
      if (!d.ok) return conn.close();
      const req = d.message;
      if (req.op === 'hello') {
        await conn.send(encodeFrame({ op: 'hello', id: req.id, version: PROTOCOL_VERSION, broker: 'tapbrokerd 9.9.9' }));
      } else if (req.op === 'status' && mode === 'old') {
        await conn.send(encodeFrame({ op: 'status', id: req.id, broker: 'tapbrokerd 9.9.9', version: PROTOCOL_VERSION,
          policy_sha256: 'f'.repeat(64), started: '2026-12-04T00:00:00.000Z', uid: 0, user: 'root', leases: 0, rules: [],
          connections: null }));
      } else if (req.op === 'can' && mode === 'old') {
        await conn.send(encodeFrame({ op: 'error', id: req.id, code: 'TB_E_INVALID_REQUEST', message: 'unknown field `group\'' }));
      } else if (req.op === 'create-tap' && mode === 'escape') {
        await conn.send(encodeFrame({ op: 'error', id: req.id, code: 'TB_E_POLICY_DENIED', message: '\u001b]0;owned\u0007\u001b[2Jdenied' }));
      } else if (req.op === 'create-tap') {
        const [a, b] = sys.socketpair(sys.SOCK_SEQPACKET);
        const device = {
          kind: 'tap', name: 'tb0-fake', ifindex: 7, parent: 'br0', network: null, vlan: null, mode: null, mtu: 1500,
          host_mac: 'fe:54:00:00:00:01', mac: '52:54:00:00:00:01', queues: 1, vnet_hdr: true, vhost: false, persistent: false, rule: 'r', locked: false,
        } as const;
        await conn.send(encodeFrame({ op: 'create-tap', id: req.id, device, fds: { tap: 1, vhost: 0 } }), [a]);
        sys.close(a);
        void b;
      }
    }
  })();
});
process.stdout.write('ready\n');
