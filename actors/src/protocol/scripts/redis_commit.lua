-- The Redis sink's commit, after args.lua and fence_check.lua (protocol/scripts.rs:
-- CommitArgs builds its arguments). KEYS[3] is the open-window hash, KEYS[4] the
-- conflicts hash.
--
-- Own arguments: mode (`final` or `part`), the prefix of the per-partition unit-fence
-- hashes, the conflicts' TTL in ms, then the units: count, and per unit its id, its
-- lists (count; per list: key, TTL ms, n, n values) and its hashes (count; per hash:
-- key, TTL ms, m, m pairs of field and increment). A `final` script then carries the
-- window-series hashes (same shape as hashes), the open-window states (count; per
-- partition: field, text) and the keys the sink refused to write (count; per key: key,
-- values lost), and moves the fences.
--
-- A checkpoint too big for one script is split by key-hash unit: `part` scripts apply
-- some units and record, per partition, the range end they reached in that unit's
-- fence; the `final` one applies the rest, the series and window states, moves the
-- partitions' fences and drops the unit fences it passed. Replays skip, per unit, what
-- a unit fence says is there already (aggregator.rs).
--
-- Every data write goes through redis.pcall: a command Redis refuses (a key of another
-- type, a hash field that is not a number) changes nothing, is reported as a conflict
-- and recorded in KEYS[4], and the rest of the commit applies. Out of memory can only
-- refuse a script's first write, so it aborts the script with nothing written.
local mode = next_arg()
local unit_prefix = next_arg()
local conflicts_ttl = next_arg()

local ops = 0
local conflicts = {}

local function conflict(key, err, lost)
  local reason = 'other'
  if string.find(err, 'WRONGTYPE', 1, true) then
    reason = 'wrong_type'
  elseif string.find(err, 'not an integer', 1, true) then
    reason = 'not_an_integer'
  elseif string.find(err, 'overflow', 1, true) then
    reason = 'overflow'
  end
  conflicts[#conflicts + 1] = {key, reason, lost}
end

-- One write. False, with Redis's error, when Redis refused it (nothing was written).
local function attempt(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    if string.sub(reply.err, 1, 3) == 'OOM' then
      return error(reply.err)
    end
    return false, reply.err
  end
  ops = ops + 1
  return true
end

-- Sets a key's time to live; a refusal (which only a bug could cause) is reported.
local function expire(key, ttl)
  local ok, err = attempt('PEXPIRE', key, ttl)
  if not ok then
    conflict(key, err, 0)
  end
end

-- Applies (when `apply`) or skips the lists whose count is ARGV[i]; leaves `i` at the
-- argument after them.
local function lists(apply)
  for _ = 1, tonumber(ARGV[i]) do
    local key, ttl, n = ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
    local first, last = i + 4, i + 3 + n
    i = last
    if apply then
      local j, refused = first, nil
      while j <= last and not refused do
        local upto = math.min(j + 999, last)
        local ok, err = attempt('LPUSH', key, unpack(ARGV, j, upto))
        if not ok then
          refused = err
          conflict(key, err, last - j + 1)
        end
        j = upto + 1
      end
      if not refused then
        expire(key, ttl)
      end
    end
  end
  i = i + 1
end

-- Applies (when `apply`) or skips the hashes whose count is ARGV[i]; leaves `i` at the
-- argument after them.
local function hashes(apply)
  for _ = 1, tonumber(ARGV[i]) do
    local key, ttl, m = ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
    local at = i + 4
    i = at + 2 * m - 1
    if apply then
      local wrote, foreign = false, false
      for k = 0, m - 1 do
        local field, delta = ARGV[at + 2 * k], ARGV[at + 2 * k + 1]
        if foreign then
          conflict(key, 'WRONGTYPE', tonumber(delta))
        else
          local ok, err = attempt('HINCRBY', key, field, delta)
          if ok then
            wrote = true
          else
            foreign = string.find(err, 'WRONGTYPE', 1, true) ~= nil
            conflict(key, err, tonumber(delta))
          end
        end
      end
      if wrote then
        expire(key, ttl)
      end
    end
  end
  i = i + 1
end

-- Runs `command key` with `items` appended, at most 1000 at a time (unpack's limit).
local function chunked(command, key, items)
  for j = 1, #items, 1000 do
    redis.call(command, key, unpack(items, j, math.min(j + 999, #items)))
  end
end

-- The unit fences of this script's units, per range (`stored[r][unit]`), and the units
-- that are there already: every partition's unit fence has reached its range end (a
-- retry of this very script, or events all below the unit fences, which the
-- aggregators left out). One HMGET per partition, not one HGET per unit and
-- partition: a big checkpoint has ~1000 units over every partition.
local function unit_fences(unit_ids)
  local applied, stored = {}, {}
  for _, id in ipairs(unit_ids) do
    applied[id] = true
  end
  for n, r in ipairs(ranges) do
    stored[n] = {}
    for j = 1, #unit_ids, 1000 do
      local upto = math.min(j + 999, #unit_ids)
      local found = redis.call('HMGET', unit_prefix .. r[1], unpack(unit_ids, j, upto))
      for k = j, upto do
        local fence = tonumber(found[k - j + 1])
        stored[n][unit_ids[k]] = fence
        if not fence or fence < r[4] then
          applied[unit_ids[k]] = nil
        end
      end
    end
  end
  return applied, stored
end

-- The tail of a `final` script: series hashes, window states, refused keys.
local function tail(apply)
  hashes(apply)
  local states = read_pairs()
  local refused = {}
  for _ = 1, next_int() do
    local key = next_arg()
    refused[#refused + 1] = {key, next_int()}
  end
  if apply then
    hset_pairs(KEYS[3], states)
    -- Keys anchorflow refused to write (they would land on its own bookkeeping).
    for _, r in ipairs(refused) do
      conflicts[#conflicts + 1] = {r[1], 'reserved_key', r[2]}
    end
  end
end

-- Walks the units once without writing (skipping costs a few steps per key), so that
-- arguments that do not match this layout fail the script before its first write; notes
-- the units' ids on the way.
local body = i
local unit_ids = {}
for _ = 1, next_int() do
  unit_ids[#unit_ids + 1] = next_arg()
  lists(false)
  hashes(false)
end
if mode == 'final' then
  tail(false)
end
check_end()
i = body

local verdict = fence_verdict()
if verdict then
  return verdict
end

local skip, stored = {}, {}
if mode == 'part' then
  skip, stored = unit_fences(unit_ids)
end
local moved = {}
for _ = 1, next_int() do
  local unit = next_arg()
  local apply = not skip[unit]
  lists(apply)
  hashes(apply)
  if mode == 'part' and apply then
    moved[#moved + 1] = unit
  end
end
-- A `part` script moves the unit fences of the units it applied, never back (a
-- crashed run's fence may be ahead of this replay's range end): one HSET per partition.
for n, r in ipairs(#moved > 0 and ranges or {}) do
  local pairs_ = {}
  for _, unit in ipairs(moved) do
    local fence = stored[n][unit]
    if not fence or fence < r[4] then
      pairs_[#pairs_ + 1] = unit
      pairs_[#pairs_ + 1] = r[4]
    end
  end
  chunked('HSET', unit_prefix .. r[1], pairs_)
end

if mode == 'final' then
  tail(true)
  move_fences()
  for _, r in ipairs(ranges) do
    local key = unit_prefix .. r[1]
    local fences = redis.call('HGETALL', key)
    local passed = {}
    for k = 1, #fences, 2 do
      if tonumber(fences[k + 1]) <= r[4] then
        passed[#passed + 1] = fences[k]
      end
    end
    chunked('HDEL', key, passed)
  end
end

local reply = {0, ops, #conflicts}
for c, found in ipairs(conflicts) do
  local field = found[2] .. ' ' .. found[1]
  if redis.call('HEXISTS', KEYS[4], field) == 0 and redis.call('HLEN', KEYS[4]) >= 10000 then
    field = found[2] .. ' (more keys)'
  end
  redis.call('HINCRBY', KEYS[4], field, found[3])
  if c <= 100 then
    reply[#reply + 1] = found[1]
    reply[#reply + 1] = found[2]
    reply[#reply + 1] = found[3]
  end
end
if #conflicts > 0 then
  redis.call('PEXPIRE', KEYS[4], conflicts_ttl)
end
return reply
