// ForeignPorts: the names of Open vSwitch ports that are not this broker's, as listings bring them.
import test from 'ava';
import { ForeignPorts } from '@tapbroker/broker/internal';

test('a name is kept out once its database is listed; until then the database is waited for', (t) => {
  const f = new ForeignPorts();
  const g = f.listing(new Set(['unix:/a', 'unix:/b']), new Set(['unix:/a', 'unix:/b']));
  t.is(f.waiting(), 'unix:/a');
  f.listed('unix:/a', new Set(['tb1-x']), g);
  t.is(f.of('tb1-x'), 'unix:/a');
  t.is(f.waiting(), 'unix:/b', 'one database still unlisted');
  f.listed('unix:/b', new Set(), g);
  t.is(f.waiting(), null);
  t.is(f.of('tb1-y'), null);
});

// Found by an outside re-test: a database the policy no longer names kept its names out until a restart.
test('a database a listing no longer names is forgotten, names and wait alike', (t) => {
  const f = new ForeignPorts();
  f.listed('unix:/a', new Set(['tb1-x']), f.listing(new Set(['unix:/a', 'unix:/b']), new Set(['unix:/a', 'unix:/b'])));
  f.listing(new Set(), new Set());
  t.is(f.of('tb1-x'), null);
  t.is(f.waiting(), null);
  // And a late answer of the old listing does not bring it back.
  f.listed('unix:/b', new Set(['tb1-z']), 1);
  t.is(f.of('tb1-z'), null);
});

// Found by an outside re-test: of two listings in a row against a slow database, the one answered last won.
test('a listing older than the one a database already has comes too late', (t) => {
  const f = new ForeignPorts();
  const first = f.listing(new Set(['unix:/a']), new Set(['unix:/a']));
  const second = f.listing(new Set(['unix:/a']), new Set(['unix:/a']));
  f.listed('unix:/a', new Set(['tb1-new']), second);
  f.listed('unix:/a', new Set(['tb1-old']), first);
  t.is(f.of('tb1-new'), 'unix:/a');
  t.is(f.of('tb1-old'), null);
  // A database listed once keeps its last list while a later listing of it is under way.
  f.listing(new Set(['unix:/a']), new Set(['unix:/a']));
  t.is(f.waiting(), null);
  t.is(f.of('tb1-new'), 'unix:/a');
});

// Found by an outside audit: a reload's listing that found its database not answering was never tried again, and
// names callers chose stayed refused for good. The latest listing of a database never listed keeps trying it.
test('a database is awaited by the latest listing alone, until it is listed', (t) => {
  const f = new ForeignPorts();
  const start = f.listing(new Set(['unix:/a']), new Set(['unix:/a']));
  t.true(f.awaits('unix:/a', start));
  const reload = f.listing(new Set(['unix:/a']), new Set(['unix:/a']));
  t.false(f.awaits('unix:/a', start), 'the older listing stops trying');
  t.true(f.awaits('unix:/a', reload));
  f.listed('unix:/a', new Set(), reload);
  t.false(f.awaits('unix:/a', reload));
});

// Found by an outside re-test: a database only the lease table remembered (its Open vSwitch since retired, its
// network gone from the policy) was waited for at every start and reload, and refused every chosen name for good.
test('a database the policy does not name is listed where it answers, never waited for', (t) => {
  const f = new ForeignPorts();
  const g = f.listing(new Set(['unix:/named', 'unix:/remembered']), new Set(['unix:/named']));
  t.is(f.waiting(), 'unix:/named');
  t.true(f.awaits('unix:/remembered', g), 'tried until it answers all the same (an outside re-test\'s gave up)');
  f.listed('unix:/named', new Set(), g);
  t.is(f.waiting(), null, 'the remembered one is not waited for');
  f.listed('unix:/remembered', new Set(['tb1-old']), g);
  t.is(f.of('tb1-old'), 'unix:/remembered', 'but its ports count once it answers');
});
