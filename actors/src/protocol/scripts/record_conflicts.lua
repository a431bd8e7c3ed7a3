-- The writes a Redis sink transaction had refused (sinks/redis/transaction.rs), after
-- args.lua and conflicts.lua: KEYS[1] is the conflicts hash; the arguments are the
-- hash's TTL in ms, then a count and, per conflict, its key, reason and values lost.
-- Answers the number recorded.
local ttl = next_arg()
local found = {}
for _ = 1, next_int() do
  local key = next_arg()
  local reason = next_arg()
  found[#found + 1] = {key, reason, next_int()}
end
check_end()
record_conflicts(KEYS[1], ttl, found)
return #found
