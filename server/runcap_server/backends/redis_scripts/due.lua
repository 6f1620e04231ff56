-- runcap due index: claim one bucket's due members for one sweep, in one round
-- trip. The bucket and its lease share a slot ({n}).
--
-- KEYS: 1 the bucket ZSET (member "tenant/run" or "tenant/@scope" -> when to
--       look next, ms), 2 its lease
-- ARGV: 1 the replica's id, 2 now_ms ("" = the server's TIME), 3 lease ms,
--       4 most members
--
-- Replies the members due now, oldest first, with the lease taken; nothing
-- (and no lease) when none is due or another replica holds the lease.

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', num(now_ms()), 'LIMIT', 0,
  tonumber(ARGV[4]))
if #due == 0 then return due end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[3]) then return {} end
return due
