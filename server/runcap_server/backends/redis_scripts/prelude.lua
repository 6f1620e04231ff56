-- runcap: helpers shared by every script; prepended to each when it is loaded
-- (redis.py), so each script stays one self-contained EVAL.
--
-- ARGV[2] is always the test clock's now_ms, or "" for the server's TIME.

-- Lua numbers are doubles: integers are written with %d, never tostring.
local function num(n)
  return string.format('%d', n)
end

local function opt(n)
  if n == nil then return '' end
  return num(n)
end

local function now_ms()
  if ARGV[2] ~= '' then return tonumber(ARGV[2]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
