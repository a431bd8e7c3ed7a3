-- The Redis sink's commit, after args.lua, fence_check.lua and conflicts.lua (protocol/scripts.rs:
-- CommitArgs builds its arguments). KEYS[3] is the open-window hash, KEYS[4] the
-- conflicts hash.
--
-- Own arguments: mode (`final`, `part` or `unstage`), the prefix of the per-partition
-- unit-fence hashes, the conflicts' TTL in ms, then the lists' expiries (count, then
-- each: a *class*, a TTL in ms or two day ends, see ttl_of), then the units: count, and per unit its id, its lists per class
-- (single-value lists: count, then key and value each; the others: count, then key, n
-- and n values each; every list of a class gets its TTL) and its hashes (count; per
-- hash: key, TTL ms, m, m pairs of field and increment). Most lists get one value per
-- commit, and every argument costs Redis its parsing and a Lua string: a single-value
-- list is two arguments, not four. A `final` script then carries the window-series
-- hashes (same shape as hashes), the staged series (the staging list,
-- the set of pending staging lists, n, and n batches; an empty list name when there
-- are none), the open-window states (count; per partition: field, text) and the keys
-- the sink refused to write (count; per key: key, values lost), and moves the fences.
--
-- Series too many for the final script are **staged**: the final pushes them onto a
-- list named after the commit and adds the list to the pending set, atomically with
-- the fences. Each item is one batch of series, sized for one script: a JSON array of
-- hashes, each `[key, TTL ms, field, increment, field, increment, …]`, all strings; a
-- push copies bytes, with no work per field. An `unstage` script (arguments: the list and
-- the pending set) applies the list's first batch and pops it, in one script, so every
-- batch applies once, whoever unstages it (this sink right after its final, or a
-- claim, for lists a crash left pending). An unstage that finds the list gone answers
-- `{0, -1}`.
--
-- A checkpoint too big for one script is split by key-hash unit: `part` scripts apply
-- a run of units and record, per partition, the range end they reached as one unit
-- fence over that run (field `first-last`); the `final` one applies the rest, the
-- series and window states, moves the partitions' fences and drops the unit fences it
-- passed. Replays skip, per unit, what a unit fence says is there already
-- (aggregator.rs).
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

-- Redis's error when it refused a write (nothing was written), else nil. Out of memory
-- aborts the script.
local function refusal(reply)
  if type(reply) == 'table' and reply.err then
    if string.sub(reply.err, 1, 3) == 'OOM' then
      return error(reply.err)
    end
    return reply.err
  end
  ops = ops + 1
  return nil
end

local argv, pcall_, unpack_, min = ARGV, redis.pcall, unpack, math.min

-- One write. False, with Redis's error, when Redis refused it (nothing was written).
local function attempt(...)
  local err = refusal(pcall_(...))
  return not err, err
end

-- The lists' TTL classes (read before the units, see the layout above).
local list_ttls = {}

-- Pushes `first`..`last` of ARGV onto `key` (at most 1000 at a time, unpack's limit),
-- then sets its TTL; a refusal is a conflict and stops the rest of this key.
local function push(key, ttl, first, last)
  local err
  if first == last then
    err = refusal(pcall_('LPUSH', key, argv[first]))
    if err then
      conflict(key, err, 1)
    end
  else
    local j = first
    while j <= last and not err do
      local upto = min(j + 999, last)
      err = refusal(pcall_('LPUSH', key, unpack_(argv, j, upto)))
      if err then
        conflict(key, err, last - j + 1)
      end
      j = upto + 1
    end
  end
  if not err then
    err = refusal(pcall_('PEXPIRE', key, ttl))
    if err then
      conflict(key, err, 0)
    end
  end
end

-- Applies (when `apply`) or skips one unit's lists, class by class, starting at
-- ARGV[i]; leaves `i` at the argument after them.
local function lists(apply)
  local at = i
  for c = 1, #list_ttls do
    local ttl = list_ttls[c]
    local singles = tonumber(argv[at])
    if apply then
      for k = at + 1, at + 2 * singles, 2 do
        push(argv[k], ttl, k + 1, k + 1)
      end
    end
    at = at + 2 * singles + 1
    for _ = 1, tonumber(argv[at]) do
      local key, n = argv[at + 1], tonumber(argv[at + 2])
      local first, last = at + 3, at + 2 + n
      if apply then
        push(key, ttl, first, last)
      end
      at = last
    end
    at = at + 1
  end
  i = at
end

-- Increments one hash: the field/increment pairs of `items` from index `first` to
-- `last`, then the key's TTL if anything was written. A key of another type refuses
-- every field: after the first refusal the rest are reported without asking Redis.
local function increment(key, ttl, items, first, last)
  local wrote, foreign = false, false
  for k = first, last, 2 do
    local field, delta = items[k], items[k + 1]
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
    local ok, err = attempt('PEXPIRE', key, ttl)
    if not ok then
      conflict(key, err, 0)
    end
  end
end

-- Applies (when `apply`) or skips the hashes whose count is ARGV[i]; leaves `i` at the
-- argument after them.
local function hashes(apply)
  for _ = 1, tonumber(ARGV[i]) do
    local key, ttl, m = ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
    local at = i + 4
    i = at + 2 * m - 1
    if apply then
      increment(key, ttl, ARGV, at, at + 2 * m - 1)
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

-- A unit-fence field names the units it covers: `a-b` (units a to b), or `u` (one
-- unit, as fences were stored before ranges).
local function span(field)
  local a, b = string.match(field, '^(%d+)-(%d+)$')
  if a then
    return tonumber(a), tonumber(b)
  end
  local u = tonumber(field)
  return u, u
end

-- The units of this script that are there already: for every range, a stored unit
-- fence at or beyond its end covers them (a retry of this very script, or events all
-- below the unit fences, which the aggregators left out). A part records one span per
-- partition, so each hash holds a few fields; the first range with none over this
-- script's units ends the search (the usual case).
local function applied_units(unit_ids, lo, hi)
  local applied = {}
  for _, id in ipairs(unit_ids) do
    applied[id] = true
  end
  for _, r in ipairs(ranges) do
    local stored = redis.call('HGETALL', unit_prefix .. r[1])
    local spans = {}
    for k = 1, #stored, 2 do
      local a, b = span(stored[k])
      if tonumber(stored[k + 1]) >= r[4] and a <= hi and b >= lo then
        spans[#spans + 1] = {a, b}
      end
    end
    if #spans == 0 then
      return {}
    end
    for _, id in ipairs(unit_ids) do
      local u, inside = tonumber(id), false
      for _, s in ipairs(spans) do
        inside = inside or (s[1] <= u and u <= s[2])
      end
      if not inside then
        applied[id] = nil
      end
    end
  end
  return applied
end

-- The staged series of a `final` script: the batches pushed as they are onto the
-- staging list, at most 1000 per push (unpack's limit), and the list marked pending.
local function staged(apply)
  local list, pending, n = ARGV[i], ARGV[i + 1], int_at(i + 2)
  local first, last = i + 3, i + 2 + n
  i = last + 1
  if apply and n > 0 then
    for j = first, last, 1000 do
      redis.call('RPUSH', list, unpack(argv, j, math.min(j + 999, last)))
    end
    redis.call('SADD', pending, list)
  end
end

-- The tail of a `final` script: series hashes, staged series, window states, refused
-- keys.
local function tail(apply)
  hashes(apply)
  staged(apply)
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

-- The reply of an applied script, `{0, ops, conflicts[, key, reason, lost]…}` (the
-- first 100), after recording the conflicts in KEYS[4].
local function applied_reply()
  record_conflicts(KEYS[4], conflicts_ttl, conflicts)
  local reply = {0, ops, #conflicts}
  for c = 1, math.min(#conflicts, 100) do
    local found = conflicts[c]
    reply[#reply + 1] = found[1]
    reply[#reply + 1] = found[2]
    reply[#reply + 1] = found[3]
  end
  return reply
end

-- An `unstage` script: applies the staging list's first batch and pops it. It carries no
-- ranges and moves no fence: the final that staged the list was fenced. The batch is
-- decoded before the first write, so one that is not what a final stages fails the
-- script with nothing written.
if mode == 'unstage' then
  local list, pending = next_arg(), next_arg()
  check_end()
  local batch = redis.call('LINDEX', list, 0)
  if not batch then
    redis.call('SREM', pending, list)
    return {0, -1}
  end
  local decoded, series = pcall(cjson.decode, batch)
  if not decoded or type(series) ~= 'table' then
    return error('anchorflow: a staged series batch of ' .. list .. ' is not one: ' .. tostring(series))
  end
  for _, hash in ipairs(series) do
    increment(hash[1], hash[2], hash, 3, #hash)
  end
  redis.call('LPOP', list)
  if redis.call('EXISTS', list) == 0 then
    redis.call('SREM', pending, list)
  end
  return applied_reply()
end

-- Redis's clock in ms, read once (a commit's lists all expire by the same clock).
local now_ms = nil

-- A class's time to live in ms from now: the class itself (a number of ms), or for
-- `at:first:second` the time until the first of those instants still ahead by Redis's
-- clock, now, when the script runs; past both, whole days after the second. A commit
-- that waited (a stall, retries, a queue) thus never carries a list past its day's end.
local function ttl_of(class)
  local first, second = string.match(class, '^at:(%d+):(%d+)$')
  if not first then
    return tonumber(class) or error('anchorflow: script arguments do not match their layout (a list expiry is ' .. class .. ')')
  end
  if not now_ms then
    local t = redis.call('TIME')
    now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  local at = tonumber(first)
  if at <= now_ms then
    at = tonumber(second)
  end
  while at <= now_ms do
    at = at + 86400000
  end
  return at - now_ms
end

-- The lists' expiry classes: count, then each.
for _ = 1, int_at(i) do
  list_ttls[#list_ttls + 1] = ttl_of(argv[i + 1])
  i = i + 1
end
i = i + 1

-- Walks the units once without writing, reading only the counts (one step per key), so
-- that arguments that do not match this layout fail the script before its first write;
-- notes the units' ids on the way.
local body = i
local unit_ids = {}
do
  -- Per class, single-value lists are key and value; the others key, n and n values.
  -- Each hash is key, TTL, m and m pairs.
  local at = i + 1
  for _ = 1, int_at(i) do
    unit_ids[#unit_ids + 1] = argv[at]
    at = at + 1
    for _ = 1, #list_ttls do
      at = at + 1 + 2 * int_at(at)
      for _ = 1, int_at(at) do
        at = at + 2 + int_at(at + 2)
      end
      at = at + 1
    end
    for _ = 1, int_at(at) do
      at = at + 3 + 2 * int_at(at + 3)
    end
    at = at + 1
  end
  i = at
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

-- A `part` script covers the units from its first to its last: those between carry no
-- write of this commit, so they are as applied as the rest.
local lo, hi = nil, nil
for _, id in ipairs(unit_ids) do
  local u = tonumber(id)
  lo, hi = math.min(lo or u, u), math.max(hi or u, u)
end
local skip = {}
if mode == 'part' and lo then
  skip = applied_units(unit_ids, lo, hi)
end
for _ = 1, next_int() do
  local unit = next_arg()
  local apply = not skip[unit]
  lists(apply)
  hashes(apply)
end
-- A `part` script records its span in every partition's unit fences, never lowering a
-- span already there (a crashed run's fence may be ahead of this replay's range end;
-- a lower span beside a higher one changes nothing, the claim takes the highest).
if mode == 'part' and lo then
  local field = lo .. '-' .. hi
  for _, r in ipairs(ranges) do
    local key = unit_prefix .. r[1]
    local stored = tonumber(redis.call('HGET', key, field))
    if not stored or stored < r[4] then
      redis.call('HSET', key, field, r[4])
    end
  end
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

return applied_reply()
