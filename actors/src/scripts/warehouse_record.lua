-- The warehouse sink's commit record (warehouse_sink.rs), after fence_check.lua.
-- KEYS[3] is the publish hash, KEYS[4] the open-window hash, KEYS[5] the folders
-- awaiting their partition commit, KEYS[6] the committed folders, KEYS[7] the
-- published watermarks.
--
-- Own arguments: the record's id and file list (stored in KEYS[3] unless empty); the
-- folders that received rows (count, folders; each added to KEYS[5] unless already
-- committed); the checkpoint's watermark (`-` if unknown) and the partitions it now
-- covers (count, partitions; raised in KEYS[7]); per partition the open
-- `dws_template_state_1m` windows (count; field, text; stored in KEYS[4]).
local verdict = fence_verdict()
if verdict then
  return verdict
end
if ARGV[i + 1] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
i = i + 2
local folders = tonumber(ARGV[i])
i = i + 1
for _ = 1, folders do
  if redis.call('SISMEMBER', KEYS[6], ARGV[i]) == 0 then
    redis.call('SADD', KEYS[5], ARGV[i])
  end
  i = i + 1
end
local mark = ARGV[i]
i = i + 1
local partitions = tonumber(ARGV[i])
i = i + 1
for _ = 1, partitions do
  if mark ~= '-' then
    local old = redis.call('HGET', KEYS[7], ARGV[i])
    if not old or tonumber(old) < tonumber(mark) then
      redis.call('HSET', KEYS[7], ARGV[i], mark)
    end
  end
  i = i + 1
end
hset_pairs(KEYS[4])
move_fences()
return {0, 1}
