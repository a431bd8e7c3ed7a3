-- Prologue of every fenced commit script (both sinks; see fences.rs).
-- KEYS[1] is the fences hash, KEYS[2] the lost marker. ARGV[1] names the sink
-- (`redis` or `warehouse`), ARGV[2] the number of ranges, then per range: partition,
-- epoch, from, to. The script's own arguments start at ARGV[i].
--
-- fence_verdict() only reads. It returns nil when every range starts at its stored
-- fence under the stored epoch (apply it), {0, -1} when every fence already stands at
-- its range's end (this very commit was applied and its reply was lost: a retry must
-- not apply it twice), or a rejection {code, partition, stored}: 1 stale epoch, 2 not
-- contiguous, 3 fences missing. Fences missing also sets the lost marker, the only
-- write a refused commit makes. move_fences() moves the fences; scripts call it after
-- their own writes. hset_pairs() stores a counted list of field/value pairs.
local sink = ARGV[1]
local ranges = {}
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  ranges[#ranges + 1] = {ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])}
  i = i + 4
end

local function fence_verdict()
  local at_from, at_to, off = true, true, nil
  for _, r in ipairs(ranges) do
    local p, epoch, from, to = r[1], r[2], r[3], r[4]
    local stored_epoch = redis.call('HGET', KEYS[1], 'epoch:' .. p)
    local stored = redis.call('HGET', KEYS[1], sink .. ':' .. p)
    if not stored_epoch or not stored then
      redis.call('SET', KEYS[2], sink .. ':' .. p)
      return {3, tonumber(p), -1}
    end
    if tonumber(stored_epoch) ~= epoch then
      return {1, tonumber(p), tonumber(stored_epoch)}
    end
    stored = tonumber(stored)
    if stored ~= from then
      at_from = false
      off = off or {2, tonumber(p), stored}
    end
    if stored ~= to then
      at_to = false
    end
  end
  if at_from then
    return nil
  end
  if at_to then
    return {0, -1}
  end
  return off
end

local function move_fences()
  for _, r in ipairs(ranges) do
    redis.call('HSET', KEYS[1], sink .. ':' .. r[1], r[4])
  end
end

-- Stores pairs of field and value in the hash `key`: their count is ARGV[i], the pairs
-- follow; leaves `i` after them.
local function hset_pairs(key)
  local n = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, n do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
end
