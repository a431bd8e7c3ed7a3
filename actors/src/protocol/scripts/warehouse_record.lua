-- The warehouse sink's commit record, after args.lua and fence_check.lua
-- (protocol/scripts.rs: RecordArgs). KEYS[3] is the publish hash, KEYS[4] the
-- open-window hash, KEYS[5] the folders awaiting their partition commit, KEYS[6] the
-- committed folders, KEYS[7] the published watermarks.
--
-- Own arguments: the record's id and file list (stored in KEYS[3] unless empty); the
-- folders that received rows (count, folders; each added to KEYS[5] unless already
-- committed); the checkpoint's watermark (`-` if unknown) and the partitions it now
-- covers (count, partitions; raised in KEYS[7]); per partition the open
-- `dws_template_state_1m` windows (count; field, text; stored in KEYS[4]).
local record_id = next_arg()
local record = next_arg()
local folders = {}
for _ = 1, next_int() do
  folders[#folders + 1] = next_arg()
end
local mark = next_arg()
local partitions = {}
for _ = 1, next_int() do
  partitions[#partitions + 1] = next_arg()
end
local states = read_pairs()
check_end()

local verdict = fence_verdict()
if verdict then
  return verdict
end
if record ~= '' then
  redis.call('HSET', KEYS[3], record_id, record)
end
for _, folder in ipairs(folders) do
  if redis.call('SISMEMBER', KEYS[6], folder) == 0 then
    redis.call('SADD', KEYS[5], folder)
  end
end
if mark ~= '-' then
  for _, p in ipairs(partitions) do
    local old = redis.call('HGET', KEYS[7], p)
    if not old or tonumber(old) < tonumber(mark) then
      redis.call('HSET', KEYS[7], p, mark)
    end
  end
end
hset_pairs(KEYS[4], states)
move_fences()
return {0, 1}
