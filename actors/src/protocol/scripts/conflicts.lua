-- Recording refused writes, after args.lua in redis_commit.lua and in
-- record_conflicts.lua (protocol/scripts.rs). record_conflicts(hash, ttl, found) adds
-- each conflict of `found` ({key, reason, lost} each) to the conflicts hash: the values
-- lost summed per `reason key` field, at most 10000 fields (then per reason, under
-- `reason (more keys)`), and refreshes the hash's TTL (ms).
local function record_conflicts(hash, ttl, found)
  for _, c in ipairs(found) do
    local field = c[2] .. ' ' .. c[1]
    if redis.call('HEXISTS', hash, field) == 0 and redis.call('HLEN', hash) >= 10000 then
      field = c[2] .. ' (more keys)'
    end
    redis.call('HINCRBY', hash, field, c[3])
  end
  if #found > 0 then
    redis.call('PEXPIRE', hash, ttl)
  end
end
