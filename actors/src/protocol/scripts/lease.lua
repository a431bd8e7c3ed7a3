-- Takes an instance lease, after args.lua (protocol/scripts.rs: LeaseArgs). KEYS[1] is
-- the lease. Arguments: the holder it may replace, the new holder, the lease in ms.
-- Sets the lease when it is free or held by the first; returns the holder left in
-- place otherwise (one script, so two runs taking over the same stale holder cannot
-- both win).
local expected = next_arg()
local holder = next_arg()
local ms = next_arg()
check_end()
local held = redis.call('GET', KEYS[1])
if held == false or held == expected then
  redis.call('SET', KEYS[1], holder, 'PX', ms)
  return false
end
return held
