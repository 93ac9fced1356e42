-- Queue a task whose payload names buffers stored by digest, only if Redis holds all of them:
-- a part that vanished since the caller asked (expired, evicted, deleted) would leave the task
-- naming bytes nobody has. Run in the transaction that stores the task's record.
--
-- KEYS[1]  list    the task's queue     <p>|<s>|task-queue|<name>
-- KEYS[2…] string  parts of the buffers it names  <p>|<s>|blob:<digest>:<i>
-- ARGV[1]  the task id
-- ARGV[2]  milliseconds each part must stay at least (as in touch.lua)
--
-- Returns 1 when queued; else the keys missing (nothing was queued: the caller stores them and
-- calls this again).
local want = tonumber(ARGV[2])
local missing = {}
for i = 2, #KEYS do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl == -2 then
    missing[#missing + 1] = KEYS[i]
  elseif ttl >= 0 and ttl < want then
    redis.call('PEXPIRE', KEYS[i], want)
  end
end
if #missing > 0 then
  return missing
end
redis.call('RPUSH', KEYS[1], ARGV[1])
return 1
