-- runcap: the alert store's atomic steps (alerts/store_redis.py). Every key
-- carries the tenant's alerts hash tag {<tenant>/@alerts}, so each step is
-- one script in one slot. Numbers are written with %d: Lua numbers are
-- doubles, and times in ms are exact in them.
--
-- ARGV[1] is the step; the keys and the other arguments depend on it.

local function num(n)
  return string.format('%d', n)
end

local op = ARGV[1]

if op == 'put_rule' then
  -- KEYS: rules HASH (rule id -> "<since_ms>|<rule>")
  -- ARGV: 2 rule id, 3 rule text, 4 now_ms. Replies 1 if it changed.
  local old = redis.call('HGET', KEYS[1], ARGV[2])
  local since = ARGV[4]
  if old then
    local bar = string.find(old, '|', 1, true)
    if string.sub(old, bar + 1) == ARGV[3] then return 0 end
    since = string.sub(old, 1, bar - 1)
  end
  redis.call('HSET', KEYS[1], ARGV[2], since .. '|' .. ARGV[3])
  return 1

elseif op == 'raise' then
  -- KEYS: 1 the alert's HASH, 2 by-time ZSET, 3 pending ZSET, 4 the rate
  -- key's last delivery time (a string that expires after the interval), 5
  -- the rule's deliveries of the past hour (ZSET)
  -- ARGV: 2 alert id, 3 create_ms, 4 "1" to apply the rate limit, 5
  -- min_interval_ms, 6 max per hour, 7 due_ms, 8.. field/value pairs (state
  -- included, as given). Replies {1, state} if inserted, {0} if it existed.
  if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
  local id, now = ARGV[2], tonumber(ARGV[3])
  local fields = {}
  for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
  local state = '1'
  for i = 1, #fields, 2 do
    if fields[i] == 'state' then state = fields[i + 1] end
  end
  if ARGV[4] == '1' then
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', num(now - 3600000))
    local last = redis.call('GET', KEYS[4])
    if (last and now - tonumber(last) < tonumber(ARGV[5]))
        or redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[6]) then
      state = '4'
    else
      state = '1'
      redis.call('SET', KEYS[4], num(now), 'PX', ARGV[5])
      redis.call('ZADD', KEYS[5], num(now), id)
      redis.call('PEXPIRE', KEYS[5], 3600000)
    end
  end
  for i = 1, #fields, 2 do
    if fields[i] == 'state' then fields[i + 1] = state end
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('ZADD', KEYS[2], num(now), id)
  if state == '1' then redis.call('ZADD', KEYS[3], ARGV[7], id) end
  return {1, state}

elseif op == 'claim' then
  -- KEYS: 1 the alert's HASH, 2 pending ZSET
  -- ARGV: 2 alert id, 3 now_ms, 4 due_ms of the claim, 5 owner.
  -- Replies the alert's fields once claimed, {} if it is not due.
  local state, due = unpack(redis.call('HMGET', KEYS[1], 'state', 'due'))
  if state ~= '1' or tonumber(due) > tonumber(ARGV[3]) then return {} end
  redis.call('HSET', KEYS[1], 'owner', ARGV[5], 'due', ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
  return redis.call('HGETALL', KEYS[1])

elseif op == 'update' then
  -- KEYS: 1 the alert's HASH, 2 pending ZSET
  -- ARGV: 2 alert id, 3 owner, 4 state, 5 attempts, 6 last error, 7 done,
  -- 8 due_ms. Replies 1, or 0 when `owner` no longer holds the claim.
  if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[3] then return 0 end
  redis.call('HSET', KEYS[1], 'state', ARGV[4], 'attempts', ARGV[5], 'err', ARGV[6],
    'done', ARGV[7], 'due', ARGV[8])
  if ARGV[4] == '1' then
    redis.call('ZADD', KEYS[2], ARGV[8], ARGV[2])
  else
    redis.call('ZREM', KEYS[2], ARGV[2])
  end
  return 1

elseif op == 'save_cursor' then
  -- KEYS: cursors HASH (run id -> "<revision>|<state>")
  -- ARGV: 2 run id, 3 revision, 4 state. Keeps the later of the two.
  local old = redis.call('HGET', KEYS[1], ARGV[2])
  if old and tonumber(string.sub(old, 1, string.find(old, '|', 1, true) - 1))
      >= tonumber(ARGV[3]) then
    return 0
  end
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3] .. '|' .. ARGV[4])
  return 1

elseif op == 'save_discovery' then
  -- KEYS: discovery STRING "<created_ms>|<run id>"; ARGV: 2 created_ms, 3 run id.
  local old = redis.call('GET', KEYS[1])
  if old then
    local bar = string.find(old, '|', 1, true)
    local ms, run = tonumber(string.sub(old, 1, bar - 1)), string.sub(old, bar + 1)
    local new = tonumber(ARGV[2])
    if ms > new or (ms == new and run >= ARGV[3]) then return 0 end
  end
  redis.call('SET', KEYS[1], ARGV[2] .. '|' .. ARGV[3])
  return 1
end

return redis.error_reply('unknown alerts op ' .. tostring(op))
