-- runcap ledger: every operation on one run, atomically, in one slot.
--
-- The semantics are those of runcap_server/ledger/core.py (docs/semantics.md);
-- the conformance and stateful tests hold both to the same answers.
--
-- KEYS: 1 account HASH, 2 reservations HASH (id -> record), 3 expiry ZSET of
--       held ids (score = expires_ms), 4 change log STREAM (entry id = revision),
--       5 the run's shard channel (a doorbell for watchers; never read), 6 ZSET
--       of reservations whose parent scopes still await settlement (score =
--       when the run settled; the saga removes them, the sweeper re-drives them),
--       7 SET of the ids of the run's child runs (counted against max_children)
-- ARGV: 1 operation, 2 now_ms ("" = the server's TIME; tests only), 3 log
--       retention, 4 expiry batch, 5 closed-run retention ms, 6.. operation args
--
-- The account HASH holds the run's totals (lim com res ovr act rev st dig), its
-- configuration (cr cl lab ttl pr ak us tm lin np; gp: the policy as given,
-- types.encode_given_policy; pol: the effective policy, RunPolicy.encode, ""
-- for the defaults) and its policy's counters (thr: the highest threshold band
-- reached; tst, tun: throttle strikes and until when; rw, rc: the rate
-- window's start and allowed calls; use: the use of each dimension beyond
-- money, "name=reserved,committed;..."; apv: the run's escalations by trigger,
-- "spend" or "m:<meter>", as types.encode_approvals, "trigger=status;...",
-- sorted; written only once an approval is requested; and CALIBRATED runs
-- only: xpo, the worst cases of the holds in flight, and cal, each model's
-- observed output tokens, types.encode_calibration; blk: 1 while the run is
-- at its wall, since a BLOCKED change; bc: its blocked Reserves, a counter
-- written without a revision). A missing counter is 0, a missing use, apv or
-- cal "".
--
-- Reservation records are laid out above decode(), change log entries above
-- record(). A decision's approval trigger is derived from its reason,
-- dimension and meter (approval_of), so records need no field for it.
--
-- Replies are flat arrays: {"OK", ...} or {"ERR", reason, detail}. Nothing is
-- written before every check has passed. Lua numbers are doubles: every amount
-- is at most 2^53 - 1 (no mode holds past it, and a commit past it fails), and
-- numbers are written with %d, never tostring (nor cjson.encode); cjson only
-- decodes a policy that is not the default one.

local A, R, X, LOG, BELL, P, K = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local op = ARGV[1]
local retention = ARGV[3]
local batch = tonumber(ARGV[4])
local closed_retention_ms = tonumber(ARGV[5])
local MAX_MICROS = 9007199254740991

-- Enum values as in runcap.v1 (and ledger/types.py).
local OPEN, CLOSED, SUSPENDED = 1, 2, 3
local ALLOW, BLOCK, WARN, THROTTLE, APPROVAL_REQUIRED = 1, 2, 3, 4, 6
local WITHIN_BUDGET, INSUFFICIENT_BUDGET, RUN_CLOSED, RUN_SUSPENDED = 1, 2, 3, 6
local THROTTLED, RATE_LIMITED, IN_FLIGHT_LIMIT = 7, 8, 9
local SPEND_NEEDS_APPROVAL, METER_NEEDS_APPROVAL, APPROVAL_DENIED = 11, 12, 13
local PENDING, APPROVED, DENIED = 1, 2, 3
local HARD_GATE, SOFT_GATE, ADVISORY, ACTUALS_ONLY, CALIBRATED = 1, 2, 3, 4, 5
local D_SPEND, D_TOKENS, D_METER, D_RATE, D_IN_FLIGHT, D_EXPOSURE = 1, 2, 3, 4, 5, 6
-- types.CALIBRATION_RING, CALIBRATION_MODELS, DEFAULT_CALIBRATION_MIN_SAMPLES,
-- DEFAULT_EXPOSURE_ALLOWANCE_PERCENT; rates are per PER_RATE tokens.
local RING, MODELS, MIN_SAMPLES, ALLOWANCE_PERCENT, PER_RATE = 32, 16, 5, 10, 1000000
local STOP = 4
local LIFETIME = 1
local HELD, COMMITTED, RELEASED, EXPIRED, LATE_COMMITTED, BLOCKED = 1, 2, 3, 4, 5, 6
local CREATED, RESERVED, EV_COMMITTED, REFUNDED, EV_EXPIRED, EV_CLOSED = 1, 2, 3, 4, 5, 6
local EV_SUSPENDED, EV_RESUMED, EV_THRESHOLD = 7, 8, 9
local EV_APPROVAL_REQUESTED, EV_APPROVAL_GRANTED, EV_APPROVAL_DENIED = 10, 11, 12
local EV_BLOCKED = 13
local TOKENS = 'tokens'
local SPEND_APPROVAL = 'spend'

-- Answered with THROTTLE (not now, but later), with APPROVAL_REQUIRED; an
-- advisory run only warns of these and of INSUFFICIENT_BUDGET (a denied
-- approval blocks in every mode).
local THROTTLE_REASONS = {[THROTTLED] = true, [RATE_LIMITED] = true, [IN_FLIGHT_LIMIT] = true}
local APPROVAL_REASONS = {[SPEND_NEEDS_APPROVAL] = true, [METER_NEEDS_APPROVAL] = true}
local ADVISORY_REASONS = {[THROTTLED] = true, [RATE_LIMITED] = true, [IN_FLIGHT_LIMIT] = true,
  [SPEND_NEEDS_APPROVAL] = true, [METER_NEEDS_APPROVAL] = true, [INSUFFICIENT_BUDGET] = true}

-- Holds beyond money, "name=units;..." (types.encode_dims), as a list of
-- {name, units} in the order given (sorted by name).
local function parse_dims(s)
  local list = {}
  for name, units in string.gmatch(s, '([^;]+)=(%-?%d+)') do
    list[#list + 1] = {name, tonumber(units)}
  end
  return list
end

local function encode_dims(list, skip)
  local parts = {}
  for _, d in ipairs(list) do
    if d[1] ~= skip then parts[#parts + 1] = d[1] .. '=' .. num(d[2]) end
  end
  return table.concat(parts, ';')
end

-- Reservation records: "amount|requested_ttl|status|reason|created|held|expires|actual|
-- overrun|settled|blocking scope|blocking period|fingerprint|pricing|dims|dimension|
-- meter|retry_at|uncounted" (no field holds "|"; dims as types.encode_dims, units
-- held; uncounted "1" for a block not counted yet, Reservation.uncounted).
local function decode(id, s)
  local f = {}
  for part in string.gmatch(s, '([^|]*)|?') do
    f[#f + 1] = part
    if #f == 19 then break end
  end
  return {
    id = id, amount = tonumber(f[1]), requested_ttl = tonumber(f[2]), status = tonumber(f[3]),
    reason = tonumber(f[4]), created = tonumber(f[5]), held = tonumber(f[6]),
    expires = tonumber(f[7]), actual = tonumber(f[8]), overrun = tonumber(f[9]),
    settled = tonumber(f[10]), scope = f[11] or '', period = tonumber(f[12]),
    fingerprint = f[13] or '', pricing = f[14] or '', dims = parse_dims(f[15] or ''),
    dimension = tonumber(f[16]), meter = f[17] or '', retry = tonumber(f[18]),
    uncounted = f[19] == '1',
  }
end

local function encode(r)
  return table.concat({num(r.amount), opt(r.requested_ttl), num(r.status), num(r.reason),
    num(r.created), num(r.held), opt(r.expires), opt(r.actual), num(r.overrun),
    opt(r.settled), r.scope or '', opt(r.period), r.fingerprint or '', r.pricing or '',
    encode_dims(r.dims or {}), opt(r.dimension), r.meter or '', opt(r.retry),
    r.uncounted and '1' or ''}, '|')
end

-- The escalation trigger a decision awaits or was denied by, "" if none
-- (Reservation.approval: derived, so records need no field for it).
local function approval_of(r)
  if not APPROVAL_REASONS[r.reason] and r.reason ~= APPROVAL_DENIED then return '' end
  if r.dimension == D_METER then return 'm:' .. r.meter end
  return SPEND_APPROVAL
end

local FIELDS = {'lim', 'com', 'res', 'ovr', 'act', 'rev', 'st', 'cr', 'cl', 'lab', 'ttl', 'dig',
  'pr', 'ak', 'us', 'tm', 'lin', 'np', 'gp', 'pol', 'thr', 'tst', 'tun', 'rw', 'rc', 'use', 'apv',
  'xpo', 'cal', 'blk', 'bc'}

local function load_account()
  local v = redis.call('HMGET', A, unpack(FIELDS))
  if not v[1] then return nil end
  return {
    lim = tonumber(v[1]), com = tonumber(v[2]), res = tonumber(v[3]), ovr = tonumber(v[4]),
    act = tonumber(v[5]), rev = tonumber(v[6]), st = tonumber(v[7]), cr = tonumber(v[8]),
    cl = tonumber(v[9]), lab = v[10], ttl = tonumber(v[11]), dig = v[12],
    pr = v[13] or '', ak = v[14] or '', us = v[15] or '', tm = v[16] or '', lin = v[17] or '',
    np = tonumber(v[18]) or 0, gp = v[19] or '', pol = v[20] or '',
    thr = tonumber(v[21]) or 0, tst = tonumber(v[22]) or 0, tun = tonumber(v[23]) or 0,
    rw = tonumber(v[24]) or 0, rc = tonumber(v[25]) or 0, use = v[26] or '', apv = v[27] or '',
    xpo = tonumber(v[28]) or 0, cal = v[29] or '', blk = tonumber(v[30]) or 0,
    bc = tonumber(v[31]) or 0,
  }
end

-- The effective policy (RunPolicy.encode's short keys; a missing key is the default).
local DEFAULT_THRESHOLDS = {60, 80, 95}
-- `ap`: the approval percent (0: never); `am`: the approved meters as a set,
-- nil when there is no list (no meter needs an approval).
local DEFAULT_POLICY = {mode = HARD_GATE, margin = 0, thr = DEFAULT_THRESHOLDS, tb = 1000,
  tm = 60000, met = {}, depth = 5, ap = 0, cms = MIN_SAMPLES}

local function decode_policy(text)
  if text == '' then return DEFAULT_POLICY end
  local raw = cjson.decode(text)
  local approved = nil
  if raw.am and #raw.am > 0 then
    approved = {}
    for _, name in ipairs(raw.am) do approved[name] = true end
  end
  return {mode = raw.mode or HARD_GATE, margin = raw.margin or 0,
    thr = raw.thr or DEFAULT_THRESHOLDS, tb = raw.tb or 1000, tm = raw.tm or 60000,
    tok = raw.tok, met = raw.met or {}, rate = raw.rate, inf = raw.inf,
    depth = raw.depth or 5, kids = raw.kids, ap = raw.ap or 0, am = approved,
    cms = raw.cms or MIN_SAMPLES, xa = raw.xa, xp = raw.xp, dg = raw.dg == true}
end

local function policy_of(acc)
  if not acc.policy then acc.policy = decode_policy(acc.pol) end
  return acc.policy
end

-- The run's use per dimension: name -> {reserved, committed}, parsed when first needed.
local function usage_of(acc)
  if not acc.usage then
    local u = {}
    for name, r, c in string.gmatch(acc.use, '([^;]+)=(%-?%d+),(%-?%d+)') do
      u[name] = {tonumber(r), tonumber(c)}
    end
    acc.usage = u
  end
  return acc.usage
end

local function encode_usage(u)
  local names = {}
  for name in pairs(u) do names[#names + 1] = name end
  table.sort(names)
  local parts = {}
  for i, name in ipairs(names) do
    parts[i] = name .. '=' .. num(u[name][1]) .. ',' .. num(u[name][2])
  end
  return table.concat(parts, ';')
end

-- A dimension with no use left is dropped (core._set_usage).
local function add_use(acc, name, reserved, committed)
  local u = usage_of(acc)
  local e = u[name] or {0, 0}
  local r, c = e[1] + reserved, e[2] + committed
  if r ~= 0 or c ~= 0 then u[name] = {r, c} else u[name] = nil end
  acc.use_dirty = true
end

-- The run's escalations: trigger -> status, parsed when first needed.
local function approvals_of(acc)
  if not acc.approvals then
    local a = {}
    for _, d in ipairs(parse_dims(acc.apv)) do a[d[1]] = d[2] end
    acc.approvals = a
  end
  return acc.approvals
end

local function set_approval(acc, trigger, status)
  approvals_of(acc)[trigger] = status
  local triggers = {}
  for name in pairs(acc.approvals) do triggers[#triggers + 1] = name end
  table.sort(triggers)
  local parts = {}
  for i, name in ipairs(triggers) do parts[i] = name .. '=' .. num(acc.approvals[name]) end
  acc.apv = table.concat(parts, ';')
  acc.apv_dirty = true
end

local function tokens(acc)
  if not acc.usage and acc.use == '' then return 0, 0 end
  local e = usage_of(acc)[TOKENS]
  if not e then return 0, 0 end
  return e[1], e[2]
end

-- a * m as {high, low} digits in base 2^24, exactly (0 <= a < 2^53, 0 <= m < 2^16).
local B24 = 16777216
local function mul(a, m)
  local high = math.floor(a / B24)
  local low = (a - high * B24) * m
  local carry = math.floor(low / B24)
  return high * m + carry, low - carry * B24
end

-- Exactly a * ma >= b * mb (doubles lose the low digits of a product past 2^53).
local function ge_scaled(a, ma, b, mb)
  local ah, al = mul(a, ma)
  local bh, bl = mul(b, mb)
  return ah > bh or (ah == bh and al >= bl)
end

-- "a#b#c" split at every "#" ("" is one empty part, as Python's str.split).
local function split_hash(s)
  local parts, start = {}, 1
  while true do
    local i = string.find(s, '#', start, true)
    if not i then
      parts[#parts + 1] = string.sub(s, start)
      return parts
    end
    parts[#parts + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

-- a // m and a % m, exactly (a < 2^53; a / m may round across an integer).
local function divmod(a, m)
  local q = math.floor(a / m)
  local r = a - q * m
  if r < 0 then
    q, r = q - 1, r + m
  elseif r >= m then
    q, r = q + 1, r - m
  end
  return q, r
end

-- An LLM call's model key, input and output rates, effective max output and
-- input tokens from its pricing (core._llm_call); nil for anything else.
local function llm_call(pricing)
  local parts = split_hash(pricing)
  if #parts < 6 then return nil end
  local rin, rout = string.match(parts[2], '^(%d+),(%d+),')
  return {key = parts[4] .. '/' .. parts[5], rin = tonumber(rin), rout = tonumber(rout),
    eff = tonumber(parts[3]), inp = tonumber(parts[6])}
end

-- core.calibrated_micros: every product stays below 2^53.
local function calibrated_micros(inp, rin, out, rout)
  local qin, rmin = divmod(rin, PER_RATE)
  local qout, rmout = divmod(rout, PER_RATE)
  local q, r = divmod(inp * rmin + out * rmout, PER_RATE)
  if r > 0 then q = q + 1 end
  return inp * qin + out * qout + q
end

-- The run's observed outputs: key -> list (oldest first), parsed when first needed.
local function calibration_of(acc)
  if not acc.calibration then
    local c, n = {}, 0
    if acc.cal ~= '' then
      local parts = split_hash(acc.cal)
      for i = 1, #parts, 2 do
        local list = {}
        for v in string.gmatch(parts[i + 1], '%d+') do list[#list + 1] = tonumber(v) end
        c[parts[i]] = list
        n = n + 1
      end
    end
    acc.calibration, acc.cal_models = c, n
  end
  return acc.calibration
end

-- One operation's pending writes: applied only once nothing can fail any more.
local txn = {acc = nil, now = 0, res = {}, order = {}, changes = {}}

-- How far past the limit a CALIBRATED run's exposure may go (RunPolicy.exposure_allowance).
local function allowance(acc, p)
  if p.xa then return p.xa end
  local percent = p.xp or ALLOWANCE_PERCENT
  -- lim * percent // 100, exactly.
  local hundreds = math.floor(acc.lim / 100)
  return hundreds * percent + math.floor((acc.lim - hundreds * 100) * percent / 100)
end

-- A CALIBRATED run's exposure (committed + the worst cases in flight) and
-- its ceiling (limit + allowance); nil in other modes (Account.exposure).
local function exposure(acc)
  local p = policy_of(acc)
  if p.mode ~= CALIBRATED then return nil end
  return acc.com + acc.xpo, acc.lim + allowance(acc, p)
end

local function state(acc)
  local reserved_tokens, committed_tokens = tokens(acc)
  local xpo, ceiling = exposure(acc)
  return {num(acc.lim), num(acc.com), num(acc.res), num(acc.rev), num(acc.st), num(acc.act),
    num(acc.ovr), acc.dig, num(acc.thr), num(committed_tokens), num(reserved_tokens),
    num(xpo or 0), num(ceiling or 0), num(acc.blk)}
end

local function put(r)
  if not txn.res[r.id] then txn.order[#txn.order + 1] = r.id end
  txn.res[r.id] = r
end

-- Change log entries: t type, r reservation, a amount, c actual, o overrun, l late,
-- h threshold crossed, ts time, d digest, then the state after the change: L limit,
-- C committed, R reserved, S status, N active holds, O overrun, B threshold band,
-- U committed tokens, V reserved tokens; only on the APPROVAL_ events, g the
-- approval's trigger; only on BLOCKED events, the verdict: k reason, q blocking
-- scope, p blocking period, m dimension, n meter ("" when unset); only while the
-- run is blocked, K 1; and only for a CALIBRATED run, X its exposure and Y the
-- exposure's ceiling. The digest is types.chain_digest's.
local function record(kind, r, amount, actual, overrun, late, threshold, approval)
  local acc = txn.acc
  acc.rev = acc.rev + 1
  if r then put(r) end
  local rid = r and r.id or ''
  local text = table.concat({acc.dig, num(acc.rev), num(kind), rid, num(amount or 0),
    num(actual or 0), num(overrun or 0), late and '1' or '0'}, '|')
  if threshold and threshold ~= 0 then text = text .. '|' .. num(threshold) end
  if approval and approval ~= '' then text = text .. '|a:' .. approval end
  if kind == EV_BLOCKED then
    -- types.block_text: reason|dimension|period|scope|meter.
    text = text .. '|b:' .. table.concat({num(r.reason), num(r.dimension or 0),
      num(r.period or 0), r.scope or '', r.meter or ''}, '|')
  end
  acc.dig = redis.sha1hex(text)
  local reserved_tokens, committed_tokens = tokens(acc)
  local entry = {
    num(acc.rev) .. '-1',
    't', num(kind), 'r', rid, 'a', num(amount or 0), 'c', num(actual or 0),
    'o', num(overrun or 0), 'l', late and '1' or '0', 'h', num(threshold or 0),
    'ts', num(txn.now), 'd', acc.dig,
    'L', num(acc.lim), 'C', num(acc.com), 'R', num(acc.res), 'S', num(acc.st),
    'N', num(acc.act), 'O', num(acc.ovr), 'B', num(acc.thr), 'U', num(committed_tokens),
    'V', num(reserved_tokens),
  }
  if approval and approval ~= '' then
    entry[#entry + 1] = 'g'
    entry[#entry + 1] = approval
  end
  if kind == EV_BLOCKED then
    for _, kv in ipairs({{'k', num(r.reason)}, {'q', r.scope or ''}, {'p', opt(r.period)},
        {'m', opt(r.dimension)}, {'n', r.meter or ''}}) do
      entry[#entry + 1] = kv[1]
      entry[#entry + 1] = kv[2]
    end
  end
  if acc.blk == 1 then
    entry[#entry + 1] = 'K'
    entry[#entry + 1] = '1'
  end
  local xpo, ceiling = exposure(acc)
  if xpo then
    entry[#entry + 1] = 'X'
    entry[#entry + 1] = num(xpo)
    entry[#entry + 1] = 'Y'
    entry[#entry + 1] = num(ceiling)
  end
  txn.changes[#txn.changes + 1] = entry
end

-- Take a held reservation's holds off the run's totals. Returns the money.
local function unhold(r)
  local acc = txn.acc
  acc.res = acc.res - r.held
  acc.act = acc.act - 1
  if policy_of(acc).mode == CALIBRATED then
    acc.xpo = acc.xpo - r.amount
    acc.xpo_dirty = true
  end
  for _, d in ipairs(r.dims) do add_use(acc, d[1], -d[2], 0) end
  return r.held
end

-- Count a Reserve answered DECISION_BLOCK; the first of a series marks the
-- run blocked, with a BLOCKED change (core._Txn.count_block).
local function count_block(r)
  local acc = txn.acc
  acc.bc = acc.bc + 1
  acc.bc_dirty = true
  if acc.blk ~= 1 then
    acc.blk = 1
    record(EV_BLOCKED, r, r.amount)
  end
end

local function expire(r)
  local held = unhold(r)
  r.status = EXPIRED
  r.settled = txn.now
  record(EV_EXPIRED, r, held)
end

-- Start an operation on an existing run, with its due holds expired.
local function open_run()
  local acc = load_account()
  if not acc then return false end
  txn.acc = acc
  txn.now = now_ms()
  local due = redis.call('ZRANGEBYSCORE', X, '-inf', num(txn.now), 'LIMIT', 0, batch)
  if #due > 0 then
    local records = redis.call('HMGET', R, unpack(due))
    for i, id in ipairs(due) do
      expire(decode(id, records[i]))
    end
  end
  return true
end

-- The reservation as it stands in this operation (expired if it was due).
local function reservation(id)
  if txn.res[id] then return txn.res[id] end
  local s = redis.call('HGET', R, id)
  if not s then return nil end
  local r = decode(id, s)
  if r.status == HELD and r.expires and r.expires <= txn.now then expire(r) end
  return r
end

local function apply()
  local acc = txn.acc
  for _, id in ipairs(txn.order) do
    local r = txn.res[id]
    redis.call('HSET', R, id, encode(r))
    if r.status == HELD then
      redis.call('ZADD', X, num(r.expires), id)
    else
      redis.call('ZREM', X, id)
    end
  end
  for _, c in ipairs(txn.changes) do
    -- Exact trimming keeps the log's floor the same on every backend.
    redis.call('XADD', LOG, 'MAXLEN', retention, unpack(c))
  end
  if #txn.changes > 0 then
    redis.call('HSET', A, 'lim', num(acc.lim), 'com', num(acc.com), 'res', num(acc.res),
      'ovr', num(acc.ovr), 'act', num(acc.act), 'rev', num(acc.rev), 'st', num(acc.st),
      'cl', opt(acc.cl), 'dig', acc.dig, 'blk', num(acc.blk))
    if acc.counters_dirty then
      redis.call('HSET', A, 'thr', num(acc.thr), 'tst', num(acc.tst), 'tun', num(acc.tun),
        'rw', num(acc.rw), 'rc', num(acc.rc))
    end
    if acc.use_dirty then
      acc.use = encode_usage(acc.usage)
      redis.call('HSET', A, 'use', acc.use)
    end
    if acc.apv_dirty then redis.call('HSET', A, 'apv', acc.apv) end
    if acc.xpo_dirty then redis.call('HSET', A, 'xpo', num(acc.xpo)) end
    redis.call('SPUBLISH', BELL, num(acc.rev))
  end
  if acc.bc_dirty then redis.call('HSET', A, 'bc', num(acc.bc)) end
  if acc.st == CLOSED then
    -- Closed runs age out; holds made before the close can still settle. The
    -- retention counts from the last change (the close, a settlement): a read
    -- must not renew it, or a run a dashboard keeps listing would never go.
    for _, key in ipairs({A, R, X, LOG, P, K}) do
      if #txn.changes > 0 or redis.call('PTTL', key) == -1 then
        redis.call('PEXPIRE', key, closed_retention_ms)
      end
    end
  end
  return state(acc)
end

local function ok(...)
  local reply = {'OK'}
  for _, part in ipairs({...}) do
    if type(part) == 'table' then
      for _, v in ipairs(part) do reply[#reply + 1] = v end
    else
      reply[#reply + 1] = part
    end
  end
  return reply
end

local function err(reason, detail)
  return {'ERR', reason, detail or ''}
end

-- The run's configuration, after apply(): created, closed, labels, default ttl,
-- lineage, parent run, API key, user, team, policy as given, effective policy,
-- number of children, use per dimension, escalations, blocked Reserves.
local function config(acc)
  return {num(acc.cr), opt(acc.cl), acc.lab, opt(acc.ttl), acc.lin, acc.pr, acc.ak, acc.us,
    acc.tm, acc.gp, acc.pol, num(redis.call('SCARD', K)), acc.use, acc.apv, num(acc.bc)}
end

local ops = {}

-- ARGV 6..: limit, labels (canonical JSON), default ttl ms or "", then the
-- parent run, API key, user and team as given, the lineage (JSON) and its
-- number of parent scopes, the policy as given and the effective policy, and
-- "1" to only find an existing run (RUN_NOT_FOUND if there is none).
function ops.create()
  local lim, lab, ttl = tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
  local pr, ak, us, tm, lin, np = ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14]
  local gp, pol, existing_only = ARGV[15], ARGV[16], ARGV[17] == '1'
  if open_run() then
    local acc = txn.acc
    if acc.lim ~= lim or acc.lab ~= lab or acc.ttl ~= ttl or acc.pr ~= pr or acc.ak ~= ak
        or acc.us ~= us or acc.tm ~= tm or acc.gp ~= gp then
      return err('RUN_ALREADY_EXISTS')
    end
    return ok('1', apply(), config(acc))
  end
  if existing_only then return err('RUN_NOT_FOUND') end
  txn.now = now_ms()
  txn.acc = {lim = lim, com = 0, res = 0, ovr = 0, act = 0, rev = 0, st = OPEN, cr = txn.now,
    cl = nil, lab = lab, ttl = ttl, dig = '', lin = lin, pr = pr, ak = ak, us = us, tm = tm,
    np = tonumber(np), gp = gp, pol = pol, thr = 0, tst = 0, tun = 0, rw = 0, rc = 0, use = '',
    apv = '', xpo = 0, cal = '', blk = 0, bc = 0}
  redis.call('HSET', A, 'cr', num(txn.now), 'lab', lab, 'ttl', opt(ttl), 'pr', pr, 'ak', ak,
    'us', us, 'tm', tm, 'lin', lin, 'np', np, 'gp', gp, 'pol', pol)
  record(CREATED)
  return ok('0', apply(), config(txn.acc))
end

-- Count a new child run (ARGV 6: its id) within max_children: idempotent per
-- child, no change of the run's budget (no revision). Replies "1" when newly
-- counted; a closed run adopts none.
function ops.adopt()
  local child = ARGV[6]
  local v = redis.call('HMGET', A, 'st', 'pol')
  if not v[1] then return err('RUN_NOT_FOUND') end
  if tonumber(v[1]) == CLOSED then return err('RUN_CLOSED') end
  if redis.call('SISMEMBER', K, child) == 1 then return ok('0') end
  local limit = decode_policy(v[2] or '').kids
  if limit and redis.call('SCARD', K) >= limit then return err('SUBAGENT_LIMIT', num(limit)) end
  redis.call('SADD', K, child)
  return ok('1')
end

function ops.get()
  if not open_run() then return err('RUN_NOT_FOUND') end
  return ok(apply(), config(txn.acc))
end

-- ARGV 6..: how long a settlement may wait for its parents (ms). Replies the
-- number of holds released, the next time to look ("" if never), the lineage,
-- then each reservation whose parents waited longer: id, actual or "" (a refund).
function ops.expire()
  local wait = tonumber(ARGV[6])
  if not open_run() then
    redis.call('DEL', P)
    return ok('0', '')
  end
  local released = #txn.changes
  apply()
  local reply = {'OK', num(released), '', txn.acc.lin}
  local next_due = redis.call('ZRANGE', X, 0, 0, 'WITHSCORES')
  local next_settle = redis.call('ZRANGE', P, 0, 0, 'WITHSCORES')
  local soonest = tonumber(next_due[2])
  if next_settle[2] then
    local t = tonumber(next_settle[2]) + wait
    if not soonest or t < soonest then soonest = t end
  end
  reply[3] = opt(soonest)
  local stale = redis.call('ZRANGEBYSCORE', P, '-inf', num(txn.now - wait), 'LIMIT', 0, batch)
  for _, id in ipairs(stale) do
    local r = decode(id, redis.call('HGET', R, id))
    reply[#reply + 1] = id
    reply[#reply + 1] = r.status == RELEASED and '' or opt(r.actual)
  end
  return reply
end

-- Whether the run's dollar ceiling, as its mode reads it, admits the amount.
local function fits_money(acc, p, amount)
  local used = acc.com + acc.res
  if p.mode == ACTUALS_ONLY then return used < acc.lim end
  local margin = 0
  if p.mode == SOFT_GATE and p.margin ~= 0 then
    -- lim * margin // 100, exactly.
    local hundreds = math.floor(acc.lim / 100)
    margin = hundreds * p.margin + math.floor((acc.lim - hundreds * 100) * p.margin / 100)
  end
  return used + amount - acc.lim <= margin
end

-- A CALIBRATED run's second ceiling: committed + the worst cases in flight,
-- this one's included, within the limit plus the allowance.
local function fits_exposure(acc, p, worst)
  if p.mode ~= CALIBRATED then return true end
  return acc.com + acc.xpo + worst - acc.lim <= allowance(acc, p)
end

-- What a new reservation holds, and the pricing stored with it (core._calibrated).
local function calibrated(acc, p, amount, pricing)
  if p.mode ~= CALIBRATED then return amount, pricing end
  local call = llm_call(pricing)
  if not call then return amount, pricing end
  local samples = calibration_of(acc)[call.key] or {}
  local n = #samples
  if n < p.cms then return amount, pricing .. '##' .. num(n) end
  local out = 0
  for _, v in ipairs(samples) do
    if v > out then out = v end
  end
  if call.eff < out then out = call.eff end
  local held = calibrated_micros(call.inp, call.rin, out, call.rout)
  if amount < held then held = amount end
  return held, pricing .. '#' .. num(out) .. '#' .. num(n)
end

-- A CALIBRATED run's committed LLM call feeds its model's samples (core._observe).
local function observe(acc, p, pricing, output)
  if p.mode ~= CALIBRATED then return end
  local call = llm_call(pricing)
  if not call then return end
  local c = calibration_of(acc)
  local samples = c[call.key]
  if not samples then
    if acc.cal_models >= MODELS then return end
    samples = {}
    c[call.key] = samples
  end
  samples[#samples + 1] = output
  if #samples > RING then table.remove(samples, 1) end
  local keys = {}
  for key in pairs(c) do keys[#keys + 1] = key end
  table.sort(keys)
  local parts = {}
  for _, key in ipairs(keys) do
    local values = {}
    for i, v in ipairs(c[key]) do values[i] = num(v) end
    parts[#parts + 1] = key
    parts[#parts + 1] = table.concat(values, ',')
  end
  acc.cal = table.concat(parts, '#')
  redis.call('HSET', A, 'cal', acc.cal)
end

-- The highest threshold band the run's committed spend is in.
local function band(acc, p)
  if acc.com >= acc.lim then return STOP end
  local reached = 0
  for level = 1, 3 do
    local percent = p.thr[level]
    if percent ~= 0 and ge_scaled(acc.com, 100, acc.lim, percent) then reached = level end
  end
  return reached
end

local function in_throttle_band(acc, p)
  local percent = p.thr[3]
  return percent ~= 0 and ge_scaled(acc.com, 100, acc.lim, percent)
end

local function rate_window(p)
  return txn.now - txn.now % p.rate[2]
end

-- An escalation trigger the call trips that is not approved (nil if none): a
-- meter off the approved list, or spend past the approval percent. Called past
-- the MAX_MICROS check, so `used` is exact.
local function escalation(acc, p, amount, dims, run)
  if p.am then
    for _, d in ipairs(dims) do
      local name = d[1]
      if name ~= TOKENS and not p.am[string.sub(name, 3)] then
        local status = approvals_of(acc)[name]
        if status == DENIED then
          return {reason = APPROVAL_DENIED, dimension = D_METER, meter = string.sub(name, 3),
            scope = run}
        elseif status ~= APPROVED then
          return {reason = METER_NEEDS_APPROVAL, dimension = D_METER,
            meter = string.sub(name, 3), scope = run}
        end
      end
    end
  end
  if p.ap ~= 0 then
    local used = acc.com + acc.res
    if p.mode ~= ACTUALS_ONLY then used = used + amount end
    -- used * 100 > ap * limit, exactly.
    if not ge_scaled(acc.lim, p.ap, used, 100) then
      local status = approvals_of(acc)[SPEND_APPROVAL]
      if status == DENIED then
        return {reason = APPROVAL_DENIED, dimension = D_SPEND, scope = run}
      elseif status ~= APPROVED then
        return {reason = SPEND_NEEDS_APPROVAL, dimension = D_SPEND, scope = run}
      end
    end
  end
  return nil
end

-- The run's own verdict on a new reservation (nil allows it): money, tokens and
-- meters first (a lasting block), then escalations, then holds in flight, the
-- rate limit and the throttle band (a passing throttle). `dims` are sorted by name.
local function check(acc, p, amount, dims, run, worst)
  if not fits_money(acc, p, amount) then
    return {reason = INSUFFICIENT_BUDGET, dimension = D_SPEND, scope = run, period = LIFETIME}
  end
  if not fits_exposure(acc, p, worst) then
    return {reason = INSUFFICIENT_BUDGET, dimension = D_EXPOSURE, scope = run, period = LIFETIME}
  end
  for _, d in ipairs(dims) do
    local name, units = d[1], d[2]
    local limit
    if name == TOKENS then limit = p.tok else limit = p.met[string.sub(name, 3)] end
    if limit then
      local e = usage_of(acc)[name] or {0, 0}
      local over
      if p.mode == ACTUALS_ONLY and name == TOKENS then
        over = e[1] + e[2] >= limit
      else
        over = e[1] + e[2] + units > limit
      end
      if over and name == TOKENS then
        return {reason = INSUFFICIENT_BUDGET, dimension = D_TOKENS, scope = run}
      elseif over then
        return {reason = INSUFFICIENT_BUDGET, dimension = D_METER, meter = string.sub(name, 3),
          scope = run}
      end
    end
  end
  local v = escalation(acc, p, amount, dims, run)
  if v then return v end
  if p.inf and acc.act >= p.inf then
    return {reason = IN_FLIGHT_LIMIT, dimension = D_IN_FLIGHT, retry = txn.now + p.tb,
      scope = run}
  end
  if p.rate then
    local start = rate_window(p)
    local used = acc.rw == start and acc.rc or 0
    if used >= p.rate[1] then
      return {reason = RATE_LIMITED, dimension = D_RATE, retry = start + p.rate[2], scope = run}
    end
  end
  -- A pause past the maximum delay is from a clock that stepped back (core.py).
  if in_throttle_band(acc, p) and txn.now < acc.tun and acc.tun <= txn.now + p.tm then
    return {reason = THROTTLED, dimension = D_SPEND, retry = acc.tun, scope = run}
  end
  return nil
end

-- An allowed call uses the rate window and, in the throttle band, spaces the next one.
local function count_allowed(acc, p)
  if p.rate then
    local start = rate_window(p)
    if acc.rw ~= start then acc.rw, acc.rc = start, 0 end
    acc.rc = acc.rc + 1
    acc.counters_dirty = true
  end
  if in_throttle_band(acc, p) then
    acc.tst = acc.tst + 1
    -- A power of two times an integer is exact in a double.
    local delay = p.tb * 2 ^ math.min(acc.tst - 1, 32)
    acc.tun = txn.now + math.min(p.tm, delay)
    acc.counters_dirty = true
  end
end

-- Whether the server may still answer this block with an automatic downgrade
-- (core._may_downgrade): an LLM call blocked by a dollar or exposure ceiling
-- on a run with auto_downgrade. Counted only once answered as a block.
local function may_downgrade(p, r)
  return p.dg and r.pricing ~= '' and r.reason == INSUFFICIENT_BUDGET
    and (r.dimension == D_SPEND or r.dimension == D_EXPOSURE)
end

-- A new reservation: held if the run is open and every limit and parent allows
-- it (or the run is advisory and only a limit objects), else blocked or
-- throttled; the run's own verdict takes precedence over its parents'
-- (`pb`: reason, scope, period). `own_limits` false (an ancestor holding for a
-- descendant) checks the dollar ceiling only, and leaves its blocks to the
-- descendant to count; `count` false leaves a block uncounted (an automatic
-- downgrade's hold). No mode holds past MAX_MICROS: totals stay exact (com,
-- res and amount are each at most 2^53 - 1, and a sum past 2^53 rounds to at
-- least 2^53, so the comparison is exact).
local function decide(id, amount, requested_ttl, ttl, pb, dims, own_limits, pricing, count)
  local acc = txn.acc
  local p = policy_of(acc)
  local run = 'run:' .. acc.run
  local hold
  hold, pricing = calibrated(acc, p, amount, pricing)
  local v = nil
  local overflow = acc.com + acc.res + amount > MAX_MICROS
  if overflow then
    v = {reason = INSUFFICIENT_BUDGET, dimension = D_SPEND, scope = run, period = LIFETIME}
  elseif acc.st == CLOSED then
    v = {reason = RUN_CLOSED, scope = run, period = LIFETIME}
  elseif acc.st == SUSPENDED then
    v = {reason = RUN_SUSPENDED, scope = run, period = LIFETIME}
  elseif own_limits then
    v = check(acc, p, hold, dims, run, amount)
  elseif not fits_money(acc, p, hold) then
    v = {reason = INSUFFICIENT_BUDGET, dimension = D_SPEND, scope = run, period = LIFETIME}
  elseif not fits_exposure(acc, p, amount) then
    v = {reason = INSUFFICIENT_BUDGET, dimension = D_EXPOSURE, scope = run, period = LIFETIME}
  end
  if not v and pb then
    local dimension = nil
    if pb[1] == INSUFFICIENT_BUDGET then dimension = D_SPEND end
    v = {reason = pb[1], dimension = dimension, scope = pb[2], period = pb[3]}
  end
  local actuals = p.mode == ACTUALS_ONLY
  local held_dims = {}
  for _, d in ipairs(dims) do
    -- An actuals-only run holds no estimated tokens.
    if d[2] ~= 0 and not (actuals and d[1] == TOKENS) then held_dims[#held_dims + 1] = d end
  end
  local r = {id = id, amount = amount, requested_ttl = requested_ttl, status = BLOCKED,
    reason = WITHIN_BUDGET, created = txn.now, held = 0, overrun = 0, scope = '',
    dims = held_dims, meter = '', pricing = pricing}
  if v then
    r.reason, r.dimension, r.meter = v.reason, v.dimension, v.meter or ''
    r.scope, r.period = v.scope or '', v.period
    local trigger = approval_of(r)
    if APPROVAL_REASONS[v.reason] and not approvals_of(acc)[trigger] then
      -- The first call to trip it asks for the approval (Watch shows it).
      set_approval(acc, trigger, PENDING)
      record(EV_APPROVAL_REQUESTED, r, 0, 0, 0, false, 0, trigger)
    end
  end
  if not v or (not overflow and p.mode == ADVISORY and ADVISORY_REASONS[v.reason]) then
    local held = actuals and 0 or hold
    r.status = HELD
    r.held = held
    r.expires = txn.now + ttl
    acc.res = acc.res + held
    acc.act = acc.act + 1
    if p.mode == CALIBRATED then
      acc.xpo = acc.xpo + amount
      acc.xpo_dirty = true
    end
    for _, d in ipairs(held_dims) do add_use(acc, d[1], d[2], 0) end
    if own_limits then count_allowed(acc, p) end
    acc.blk = 0 -- money is held again: the run is off its wall
    record(RESERVED, r, held)
  else
    -- A block (or throttle) changes no money, but is remembered.
    r.retry = v.retry
    put(r)
    if own_limits and count and not THROTTLE_REASONS[r.reason]
        and not APPROVAL_REASONS[r.reason] then
      if may_downgrade(p, r) then r.uncounted = true else count_block(r) end
    end
  end
  return r
end

-- decision, reason, held, expires, blocking scope, blocking period, dimension,
-- meter, retry at, the run's mode, now, the approval awaited or denied ("" if none).
local function decision(r)
  local d
  if r.status == BLOCKED then
    if THROTTLE_REASONS[r.reason] then
      d = THROTTLE
    elseif APPROVAL_REASONS[r.reason] then
      d = APPROVAL_REQUIRED
    else
      d = BLOCK
    end
  else
    d = r.reason == WITHIN_BUDGET and ALLOW or WARN
  end
  return {num(d), num(r.reason), num(r.held), opt(r.expires), r.scope or '', opt(r.period),
    opt(r.dimension), r.meter or '', opt(r.retry), num(policy_of(txn.acc).mode), num(txn.now),
    approval_of(r)}
end

-- After the state: the worst case asked for, the pricing as stored, and a
-- CALIBRATED run's exposure and its ceiling ("" in other modes).
local function calibration(r)
  local xpo, ceiling = exposure(txn.acc)
  if not xpo then return {num(r.amount), r.pricing or '', '', ''} end
  return {num(r.amount), r.pricing or '', num(xpo), num(ceiling)}
end

-- ARGV 6..: reservation id, amount, requested ttl ms or "", server default ttl
-- ms, run id, "1" when the caller runs the parent saga (or needs none), then
-- the block decided before the run (reason, scope, period) or three "", then
-- the request's fingerprint and pricing (or ""), then its dims ("name=units;...",
-- sorted, zeros included), then "1" for an automatic downgrade's hold (its block
-- is not counted) or "". A run with parents reserved without the saga
-- answers {"OK", "SAGA", lineage, default ttl} and writes nothing. A retry is
-- compared by fingerprint when there is one, else by amount, and by its meters.
function ops.reserve()
  local id, amount, requested_ttl = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
  local default_ttl, saga = tonumber(ARGV[9]), ARGV[11]
  local pb = nil
  if ARGV[12] ~= '' then pb = {tonumber(ARGV[12]), ARGV[13], tonumber(ARGV[14])} end
  if not open_run() then return err('RUN_NOT_FOUND') end
  local acc = txn.acc
  acc.run = ARGV[10]
  if acc.np > 0 and saga ~= '1' then return {'OK', 'SAGA', acc.lin, opt(acc.ttl)} end
  local fingerprint, pricing, dims = ARGV[15], ARGV[16], parse_dims(ARGV[17])
  local prev = reservation(id)
  if prev then
    local same = prev.fingerprint == fingerprint
    if fingerprint == '' and prev.fingerprint == '' then same = prev.amount == amount end
    -- Tokens come only with a fingerprint (an LLM call), which covers them.
    if not same or prev.requested_ttl ~= requested_ttl
        or encode_dims(prev.dims, TOKENS) ~= encode_dims(dims, TOKENS) then
      return err('IDEMPOTENCY_CONFLICT', 'reserved')
    end
    -- "2": a replay of an allowance no longer held (ReserveResult.settled).
    local settled = prev.status ~= HELD and prev.status ~= BLOCKED
    return ok(settled and '2' or '1', decision(prev), apply(), calibration(prev))
  end
  local r = decide(id, amount, requested_ttl, requested_ttl or acc.ttl or default_ttl, pb, dims,
    true, pricing, ARGV[18] ~= '1')
  r.fingerprint = fingerprint
  return ok('0', decision(r), apply(), calibration(r))
end

-- Count a block left uncounted (core.count_block). ARGV 6: reservation id.
-- Idempotent. Replies the state.
function ops.count_block()
  local id = ARGV[6]
  if not open_run() then return err('RUN_NOT_FOUND') end
  local r = reservation(id)
  if not r then return err('RESERVATION_NOT_FOUND') end
  if r.uncounted then
    r.uncounted = false
    put(r)
    count_block(r)
  end
  return ok(apply())
end

-- The saga's step on an ancestor run. ARGV 6..: hold id, amount, ttl ms.
-- Replies replayed, status, reason; a missing ancestor blocks as closed.
function ops.child_hold()
  local id, amount, ttl = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
  if not open_run() then return {'OK', '0', num(BLOCKED), num(RUN_CLOSED)} end
  txn.acc.run = ARGV[9]
  local r = reservation(id)
  local replayed = r ~= nil
  if not r then r = decide(id, amount, ttl, ttl, nil, {}, false, '', false) end
  apply()
  return {'OK', replayed and '1' or '0', num(r.status), num(r.reason)}
end

-- One change per threshold band the committed spend newly reached, in order;
-- a level turned off (0%) is passed silently.
local function cross_thresholds(r)
  local acc = txn.acc
  local p = policy_of(acc)
  local reached = band(acc, p)
  while acc.thr < reached do
    acc.thr = acc.thr + 1
    acc.counters_dirty = true
    local percent = 100
    if acc.thr < STOP then percent = p.thr[acc.thr] end
    if percent ~= 0 then record(EV_THRESHOLD, r, 0, 0, 0, false, acc.thr) end
  end
end

-- Settle a held or expired reservation with its actual cost (and, when known,
-- tokens; else the tokens held); returns the overrun.
local function settle_commit(r, actual, actual_tokens)
  local acc = txn.acc
  local late = r.status == EXPIRED
  local overrun
  if late then
    overrun = actual
    r.status = LATE_COMMITTED
  else
    overrun = math.max(0, actual - r.held)
    r.status = COMMITTED
    unhold(r)
  end
  local tokens_done = false
  for _, d in ipairs(r.dims) do
    local units = d[2]
    if d[1] == TOKENS and actual_tokens then
      units = actual_tokens
      tokens_done = true
    end
    if units ~= 0 then add_use(acc, d[1], 0, units) end
  end
  if actual_tokens and not tokens_done and actual_tokens ~= 0 then
    add_use(acc, TOKENS, 0, actual_tokens)
  end
  r.actual = actual
  r.overrun = overrun
  r.settled = txn.now
  acc.com = acc.com + actual
  acc.ovr = acc.ovr + overrun
  record(EV_COMMITTED, r, r.held, actual, overrun, late)
  cross_thresholds(r)
  return overrun
end

local function settle_release(r)
  local held = unhold(r)
  r.status = RELEASED
  r.settled = txn.now
  record(REFUNDED, r, held)
  return held
end

-- ARGV 6..: reservation id, actual, actual tokens or "" (keep those held),
-- output tokens or "" (feed a CALIBRATED run's samples). Replies end with the
-- run's lineage: its parents to settle ("" for a replay they already saw).
function ops.commit()
  local id, actual, actual_tokens = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
  local output = tonumber(ARGV[9])
  if not open_run() then return err('RUN_NOT_FOUND') end
  local acc = txn.acc
  local r = reservation(id)
  if not r then return err('RESERVATION_NOT_FOUND') end
  if r.status == BLOCKED then return err('RESERVATION_BLOCKED') end
  if r.status == RELEASED then return err('RESERVATION_RELEASED') end
  if r.status == COMMITTED or r.status == LATE_COMMITTED then
    if r.actual ~= actual then return err('IDEMPOTENCY_CONFLICT', 'committed') end
    -- A replay settles the parents again only while they still wait for it (a
    -- crash between the saga's steps): once settled, a parent may have pruned
    -- the hold's record, and would count the commit twice.
    local lin = redis.call('ZSCORE', P, id) and acc.lin or ''
    return ok('1', num(r.status), num(actual), num(r.held), num(r.overrun), apply(), lin)
  end
  if acc.com + actual > MAX_MICROS then return err('TOTAL_OUT_OF_RANGE') end
  local overrun = settle_commit(r, actual, actual_tokens)
  if output then observe(acc, policy_of(acc), r.pricing, output) end
  if acc.np > 0 then redis.call('ZADD', P, num(txn.now), id) end
  return ok('0', num(r.status), num(actual), num(r.held), num(overrun), apply(), acc.lin)
end

-- ARGV 6..: reservation id.
function ops.refund()
  local id = ARGV[6]
  if not open_run() then return err('RUN_NOT_FOUND') end
  local acc = txn.acc
  local r = reservation(id)
  if not r then return err('RESERVATION_NOT_FOUND') end
  if r.status == BLOCKED then return err('RESERVATION_BLOCKED') end
  if r.status ~= HELD then
    return ok('1', num(r.status), '0', apply(), acc.lin)
  end
  local held = settle_release(r)
  if acc.np > 0 then redis.call('ZADD', P, num(txn.now), id) end
  return ok('0', num(RELEASED), num(held), apply(), acc.lin)
end

-- The commit (or refund) saga's step on an ancestor run. ARGV 6..: hold id,
-- actual ("" releases). Idempotent; the descendant's record is the truth: a
-- commit is recorded late when the hold expired, never reached this run, or was
-- blocked here while an advisory descendant held it; not at all when it would
-- bring the committed total past MAX_MICROS (the hold stays until it expires).
function ops.child_settle()
  local id, actual = ARGV[6], tonumber(ARGV[7])
  if not open_run() then return {'OK'} end
  local r = reservation(id)
  if not actual then
    if r and r.status == HELD then settle_release(r) end
  elseif txn.acc.com + actual <= MAX_MICROS then
    if not r then
      r = {id = id, amount = 0, status = EXPIRED, reason = WITHIN_BUDGET, created = txn.now,
        held = 0, overrun = 0, dims = {}, meter = ''}
    elseif r.status == BLOCKED then
      r.status = EXPIRED
    end
    if r.status == HELD or r.status == EXPIRED then settle_commit(r, actual, nil) end
  end
  apply()
  return {'OK'}
end

-- The parents of these reservations are settled. ARGV 6..: reservation ids.
function ops.settled()
  redis.call('ZREM', P, unpack(ARGV, 6))
  return {'OK'}
end

-- Approve ("1") or deny ("0") a requested escalation. ARGV 6..: trigger, approve.
-- Idempotent; a resolved one cannot be turned the other way. Replies replayed,
-- the status, the state.
function ops.approve()
  local trigger, approve = ARGV[6], ARGV[7] == '1'
  if not open_run() then return err('RUN_NOT_FOUND') end
  local acc = txn.acc
  local status = approvals_of(acc)[trigger]
  if not status then return err('APPROVAL_NOT_FOUND') end
  local target = approve and APPROVED or DENIED
  if status == target then return ok('1', num(target), apply()) end
  if status ~= PENDING then return err('APPROVAL_RESOLVED', num(status)) end
  set_approval(acc, trigger, target)
  record(approve and EV_APPROVAL_GRANTED or EV_APPROVAL_DENIED, nil, 0, 0, 0, false, 0, trigger)
  return ok('0', num(target), apply())
end

-- The kill switch and its release: no new holds while suspended.
local function set_status(status, event)
  if not open_run() then return err('RUN_NOT_FOUND') end
  local acc = txn.acc
  if acc.st == CLOSED then return err('RUN_CLOSED') end
  if acc.st == status then return ok('1', apply()) end
  acc.st = status
  record(event)
  return ok('0', apply())
end

function ops.suspend()
  return set_status(SUSPENDED, EV_SUSPENDED)
end

function ops.resume()
  return set_status(OPEN, EV_RESUMED)
end

function ops.close()
  if not open_run() then return err('RUN_NOT_FOUND') end
  local acc = txn.acc
  if acc.st == CLOSED then return ok('1', apply()) end
  acc.st = CLOSED
  acc.cl = txn.now
  record(EV_CLOSED)
  return ok('0', apply())
end

-- ARGV 6..: after revision, limit. Read-only: the log's floor, the run's
-- revision, then up to `limit` entries after `after`, each as its id, then its fields.
function ops.read()
  local after, limit = tonumber(ARGV[6]), tonumber(ARGV[7])
  local rev = redis.call('HGET', A, 'rev')
  if not rev then return err('RUN_NOT_FOUND') end
  local first = redis.call('XRANGE', LOG, '-', '+', 'COUNT', 1)
  local floor = tonumber(rev) + 1
  if #first > 0 then floor = tonumber(string.match(first[1][1], '^(%d+)')) end
  local reply = {'OK', num(floor), rev}
  if limit > 0 then
    local entries = redis.call('XRANGE', LOG, num(after + 1) .. '-0', '+', 'COUNT', limit)
    for _, e in ipairs(entries) do
      reply[#reply + 1] = e[1]
      reply[#reply + 1] = e[2]
    end
  end
  return reply
end

local handler = ops[op]
if not handler then return err('UNKNOWN_OPERATION', op) end
return handler()
