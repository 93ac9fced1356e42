-- Give back one task of a worker whose heartbeat lapsed: requeue it at the front of its queue,
-- or fail it for good once it has used up its attempts.
--
-- KEYS[1]  hash  the task               <p>|<s>|task-result:<id>
-- KEYS[2]  list  the dead worker's claims   <p>|<s>|task-running|<worker>
-- KEYS[3]  list  the task's queue       <p>|<s>|task-queue|<name>
-- KEYS[4]  list  where to announce the end (the task's done list or a client's inbox)
-- KEYS[5]  list  the dead-letter list   <p>|<s>|task-dead
-- ARGV[1]  the task id
-- ARGV[2]  the dead worker's id
-- ARGV[3]  max attempts, for a record that holds none (its own 'max_attempts' field, the limit it
--          was submitted under, wins; records written by an older rtq lack it)
-- ARGV[4]  now, in seconds since the epoch
-- ARGV[5]  milliseconds a failure stays readable at least
-- ARGV[6]  the WorkerLost error payload (an envelope)
-- ARGV[7]  the error as JSON text (type, message, traceback)
-- ARGV[8]  the dead-letter entry (JSON)
-- ARGV[9]  '1' to give the attempt back (the worker stopped on purpose, the task did not fail)
-- ARGV[10] '1' to never requeue it (a call to a session, which lived in that worker alone: it
--          fails with the error given, at most once), else '0' (optional)
--
-- Returns 'requeued', 'failed', or 'skipped' when another worker recovered it first or the task
-- is no longer the dead worker's.
if redis.call('LREM', KEYS[2], -1, ARGV[1]) == 0 then
  return 'skipped'
end
local cur = redis.call('HMGET', KEYS[1], 'state', 'owner', 'attempt', 'max_attempts')
local never = ARGV[10] == '1'
if cur[1] == 'queued' and not never then
  -- Moved into the worker's list but never claimed (the worker died between BLMOVE and
  -- claim.lua): it left the queue, so it must go back; it used no attempt.
  redis.call('LPUSH', KEYS[3], ARGV[1])
  return 'requeued'
end
if cur[1] ~= 'queued' and (cur[1] ~= 'running' or cur[2] ~= ARGV[2]) then
  return 'skipped'
end
if ARGV[9] == '1' and not never then
  redis.call('HINCRBY', KEYS[1], 'attempt', -1)
elseif never or tonumber(cur[3] or '0') >= (tonumber(cur[4] or '') or tonumber(ARGV[3])) then
  redis.call('HDEL', KEYS[1], 'result', 'result#', 'error#')
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished', ARGV[4], 'error', ARGV[6], 'error_text', ARGV[7])
  local keep = tonumber(ARGV[5])
  if redis.call('PTTL', KEYS[1]) < keep then
    redis.call('PEXPIRE', KEYS[1], keep)
  end
  redis.call('RPUSH', KEYS[4], ARGV[1])
  redis.call('PEXPIRE', KEYS[4], keep)
  redis.call('LPUSH', KEYS[5], ARGV[8])
  redis.call('LTRIM', KEYS[5], 0, 9999)
  return 'failed'
end
redis.call('HSET', KEYS[1], 'state', 'queued')
redis.call('HDEL', KEYS[1], 'owner', 'claimed')
redis.call('LPUSH', KEYS[3], ARGV[1])
return 'requeued'
