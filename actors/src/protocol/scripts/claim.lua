-- Claims partitions, after args.lua (protocol/scripts.rs: ClaimArgs): bumps each one's
-- owner epoch and returns its fences. KEYS[1] is the fences hash, KEYS[2] the lost
-- marker. Arguments: the prefix of the per-partition unit-fence hashes, the number of
-- partitions, then per partition its number and a cold-start offset for absent fences
-- (-1: the caller believes they exist).
--
-- Returns {-1} while the lost marker is set, {-2, p} when p has no fences and no
-- cold-start offset was given, else per partition: p, epoch, Redis fence, warehouse
-- fence, the number k of units whose unit fence is ahead of the Redis fence (left by a
-- crash in the middle of a split commit, see redis_commit.lua), then k pairs of unit
-- and fence.
local unit_prefix = next_arg()
local claims = {}
for _ = 1, next_int() do
  local p = next_arg()
  claims[#claims + 1] = {p, next_arg()}
end
check_end()

if redis.call('EXISTS', KEYS[2]) == 1 then
  return {-1}
end
local out = {}
for _, c in ipairs(claims) do
  local p, cold = c[1], c[2]
  local r = redis.call('HGET', KEYS[1], 'redis:' .. p)
  local w = redis.call('HGET', KEYS[1], 'warehouse:' .. p)
  if not r or not w then
    if tonumber(cold) < 0 then
      return {-2, tonumber(p)}
    end
    if not r then
      r = cold
      redis.call('HSET', KEYS[1], 'redis:' .. p, cold)
    end
    if not w then
      w = cold
      redis.call('HSET', KEYS[1], 'warehouse:' .. p, cold)
    end
  end
  local e = redis.call('HINCRBY', KEYS[1], 'epoch:' .. p, 1)
  out[#out + 1] = tonumber(p)
  out[#out + 1] = e
  out[#out + 1] = tonumber(r)
  out[#out + 1] = tonumber(w)
  -- Unit fences are stored per run of units (`a-b`, or `u` for one unit); the reply
  -- has one per unit, the highest where runs overlap.
  local units = redis.call('HGETALL', unit_prefix .. p)
  local highest, ahead = {}, {}
  for k = 1, #units, 2 do
    local fence = tonumber(units[k + 1])
    if fence > tonumber(r) then
      local a, b = string.match(units[k], '^(%d+)-(%d+)$')
      a = tonumber(a or units[k])
      for u = a, tonumber(b or a) do
        if not highest[u] then
          ahead[#ahead + 1] = u
        end
        highest[u] = math.max(highest[u] or fence, fence)
      end
    end
  end
  table.sort(ahead)
  out[#out + 1] = #ahead
  for _, u in ipairs(ahead) do
    out[#out + 1] = u
    out[#out + 1] = highest[u]
  end
end
return out
