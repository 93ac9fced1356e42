-- Store a task's outcome, unless the caller of this script no longer owns the task (fencing).
--
-- KEYS[1]  hash  the task               <p>|<s>|task-result:<id>
-- KEYS[2]  list  the worker's claims    <p>|<s>|task-running|<worker>
-- KEYS[3]  list  where to announce the end (the task's done list or a client's inbox)
-- KEYS[4]  stream  the task's events (optional) <p>|<s>|task-events:<id>: gets a 'state' entry
-- ARGV[1]  the task id
-- ARGV[2]  the worker id that claimed it
-- ARGV[3]  the attempt number of that claim
-- ARGV[4]  the final state: 'done' or 'failed'
-- ARGV[5]  now, in seconds since the epoch
-- ARGV[6]  milliseconds the outcome stays readable at least
-- ARGV[7]  the submission token the claim saw ('' to skip that check): a reused task id gets a
--          new token, so a run of the old submission can never finish the new one
-- ARGV[8…] field, value, field, value … to store (result or error payload; a payload's extra
--          frames are written by the worker with a plain HSET right before this call)
--
-- Returns 1 when stored; 0 when discarded because another attempt, a cancel or an expiry
-- overtook this one (the id leaves the worker's list either way).
redis.call('LREM', KEYS[2], -1, ARGV[1])
local cur = redis.call('HMGET', KEYS[1], 'state', 'owner', 'attempt', 'token')
if not cur[1] then
  -- No record (flushed, restarted, expired): what is there now are the big result frames the
  -- worker wrote just before this call, which would never expire. Remove them.
  redis.call('DEL', KEYS[1])
  return 0
end
if cur[1] ~= 'running' or cur[2] ~= ARGV[2] or cur[3] ~= ARGV[3] then
  return 0
end
if ARGV[7] ~= '' and cur[4] ~= ARGV[7] then
  return 0
end
redis.call('HDEL', KEYS[1], 'result', 'result#', 'error', 'error#', 'error_text')
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'finished', ARGV[5], unpack(ARGV, 8))
local keep = tonumber(ARGV[6])
if redis.call('PTTL', KEYS[1]) < keep then
  redis.call('PEXPIRE', KEYS[1], keep)
end
if KEYS[4] then
  -- After the last output and progress entries, before the caller is woken: a watcher that
  -- reads up to this entry has seen everything the task wrote.
  redis.call('XADD', KEYS[4], '*', 'state', ARGV[4])
  redis.call('PEXPIRE', KEYS[4], redis.call('PTTL', KEYS[1]))
end
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], keep)
return 1
