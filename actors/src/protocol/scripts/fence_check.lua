-- The fence check, after args.lua in both sinks' commit scripts (protocol/scripts.rs).
-- KEYS[1] is the fences hash, KEYS[2] the lost marker. The first arguments name the
-- sink (`redis` or `warehouse`), the commit's checkpoint and its ranges: count, then
-- per range partition, epoch, from, to.
--
-- fence_verdict() only reads. It returns nil when every range starts at its stored
-- fence under the stored epoch (apply it), {0, -1} when every fence already stands at
-- its range's end (this very commit was applied and its reply was lost: a retry must
-- not apply it twice), or a rejection {code, partition, stored}: 1 stale epoch, 2 not
-- contiguous, 3 fences missing. Fences missing also sets the lost marker, the only
-- write a refused commit makes. move_fences() moves the fences; scripts call it after
-- their own writes. read_pairs() reads a counted list of field/value pairs.
--
-- An empty range (from = to: the partition read nothing new, yet the commit may close
-- windows) moves no fence, so the fence alone cannot tell the commit from its retry.
-- move_fences() also stores `{sink}-checkpoint:{p}` = `epoch:checkpoint`; checkpoint
-- ids grow within an owner epoch, so an empty range whose stored checkpoint (same
-- epoch) is this one or later was applied. It also stores `{sink}-at:{p}`, Redis's
-- time of the commit, which only `anchorflow status` reads.
local sink = next_arg()
local checkpoint = next_int()
local ranges = {}
-- (Lua leaves the order in which a table constructor's fields are evaluated open:
-- arguments are read into locals first, one after another.)
for _ = 1, next_int() do
  local p = next_arg()
  local epoch = next_int()
  local from = next_int()
  ranges[#ranges + 1] = {p, epoch, from, next_int()}
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
    local pending, applied = stored == from, stored == to
    if from == to and pending then
      local last = redis.call('HGET', KEYS[1], sink .. '-checkpoint:' .. p)
      local e, c = string.match(last or '', '^(%d+):(%d+)$')
      applied = tonumber(e) == epoch and tonumber(c) >= checkpoint
      pending = not applied
    end
    if not pending then
      at_from = false
      off = off or {2, tonumber(p), stored}
    end
    if not applied then
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
  -- When, by Redis's clock in ms, for `anchorflow status` (`{sink}-at:{p}`).
  local t = redis.call('TIME')
  local at = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
  for _, r in ipairs(ranges) do
    redis.call('HSET', KEYS[1], sink .. ':' .. r[1], r[4],
      sink .. '-checkpoint:' .. r[1], r[2] .. ':' .. checkpoint,
      sink .. '-at:' .. r[1], at)
  end
end

-- Reads a count, then that many pairs of field and value.
local function read_pairs()
  local pairs_read = {}
  for _ = 1, next_int() do
    local field = next_arg()
    pairs_read[#pairs_read + 1] = {field, next_arg()}
  end
  return pairs_read
end

local function hset_pairs(key, field_values)
  for _, fv in ipairs(field_values) do
    redis.call('HSET', key, fv[1], fv[2])
  end
end
