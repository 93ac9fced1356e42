-- Which parts of buffers stored by digest Redis holds; each one held is kept at least ARGV[1]
-- milliseconds more (never less than it had: another payload may need it longer).
--
-- KEYS[1…] string  parts of buffers stored by digest  <p>|<s>|blob:<digest>:<i>
-- ARGV[1]  milliseconds each held part must stay at least
--
-- Returns one integer per key, in order: 1 held (its expiry refreshed), 0 missing.
local want = tonumber(ARGV[1])
local held = {}
for i, key in ipairs(KEYS) do
  local ttl = redis.call('PTTL', key)
  if ttl == -2 then
    held[i] = 0
  else
    if ttl >= 0 and ttl < want then
      redis.call('PEXPIRE', key, want)
    end
    held[i] = 1
  end
end
return held
