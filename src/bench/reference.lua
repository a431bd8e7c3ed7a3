-- The reference job's writes as one plain script: austin's LPUSH/EXPIRE per list and
-- HINCRBY/EXPIRE per template hash, no fences, no conflict handling.
-- ARGV: lists (count; per list: key, TTL s, n, n values), then hashes (count; per
-- hash: key, TTL s, m, m pairs of field and increment).
local i = 1
for _ = 1, tonumber(ARGV[i]) do
  local key, ttl, n = ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local j, last = i + 4, i + 3 + n
  while j <= last do
    local upto = math.min(j + 999, last)
    redis.call('LPUSH', key, unpack(ARGV, j, upto))
    j = upto + 1
  end
  redis.call('EXPIRE', key, ttl)
  i = last
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  local key, ttl, m = ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  for k = 0, m - 1 do
    redis.call('HINCRBY', key, ARGV[i + 4 + 2 * k], ARGV[i + 5 + 2 * k])
  end
  redis.call('EXPIRE', key, ttl)
  i = i + 3 + 2 * m
end
return 0
