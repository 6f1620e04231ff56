-- runcap: a tenant's own model prices, in one hash with their version.
--
-- KEYS: 1 HASH key -> price entry (JSON), and "~version" -> the version
-- ARGV: 1 "set" or "delete", 2 now_ms (unused), 3 key, 4 entry (for "set")
-- Replies {"OK", "1"} when something changed, {"OK", "0"} for deleting a
-- price that was never set.

local H = KEYS[1]
if ARGV[1] == 'set' then
  redis.call('HSET', H, ARGV[3], ARGV[4])
elseif redis.call('HDEL', H, ARGV[3]) == 0 then
  return {'OK', '0'}
end
redis.call('HINCRBY', H, '~version', 1)
return {'OK', '1'}
