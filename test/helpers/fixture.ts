// One namespace and one broker for a whole test file: made in `before`, stopped and removed in
// `after.always`, even when `before` failed half way.
import type { TestFn } from 'ava';
import { BrokerProcess } from './broker.js';
import { Netns } from './netns.js';

export type BrokerStartOptions = NonNullable<Parameters<typeof BrokerProcess.start>[2]>;

export interface BrokerFixtureOptions {
  /** Names the namespace (tbt-TAG-…) and, unless `start` says otherwise, the broker's directory. */
  tag: string;
  /** The policy, or a function giving it once the namespace is set up (after `setup`). */
  policy: string | (() => string);
  /** Bridges made with Netns.bridge, in order: a name, or a name and its options. */
  bridges?: Array<string | Parameters<Netns['bridge']>>;
  /** Veth pairs, both ends brought up (after the bridges). */
  veths?: Array<[string, string]>;
  /** Anything else the namespace needs before the broker starts (after the bridges and veths). */
  setup?: (ns: Netns) => void;
  /** Options for BrokerProcess.start (its `tag` defaults to `tag`), or a function giving them after `setup`. */
  start?: BrokerStartOptions | (() => BrokerStartOptions);
}

/**
 * Registers serial `test.before` and `test.after.always` hooks, so hooks the file registers later run
 * after this `before` and after this `after.always`. The getters throw until `before` has made them.
 */
export function brokerFixture(
  test: TestFn, opts: BrokerFixtureOptions,
): { readonly ns: Netns; readonly broker: BrokerProcess } {
  let ns: Netns | undefined;
  let broker: BrokerProcess | undefined;

  test.serial.before(async () => {
    ns = Netns.create(opts.tag);
    for (const b of opts.bridges ?? []) {
      if (typeof b === 'string') ns.bridge(b);
      else ns.bridge(...b);
    }
    for (const [a, b] of opts.veths ?? []) {
      ns.ip('link', 'add', a, 'type', 'veth', 'peer', 'name', b);
      ns.ip('link', 'set', a, 'up');
      ns.ip('link', 'set', b, 'up');
    }
    opts.setup?.(ns);
    const policy = typeof opts.policy === 'function' ? opts.policy() : opts.policy;
    const start = typeof opts.start === 'function' ? opts.start() : opts.start;
    broker = await BrokerProcess.start(ns, policy, { tag: opts.tag, ...start });
  });

  test.serial.after.always(async () => {
    try {
      await broker?.stop();
    } finally {
      ns?.destroy();
    }
  });

  return {
    get ns() {
      if (!ns) throw new Error(`brokerFixture(${opts.tag}): no namespace (test.before has not run, or failed)`);
      return ns;
    },
    get broker() {
      if (!broker) throw new Error(`brokerFixture(${opts.tag}): no broker (test.before has not run, or failed)`);
      return broker;
    },
  };
}
