-- Record a running task's progress and push it to whoever watches the task.
--
-- KEYS[1]  hash    the task             <p>|<s>|task-result:<id>
-- KEYS[2]  stream  the task's events    <p>|<s>|task-events:<id>
-- ARGV[1]  the worker id that claimed it ('' when run locally, unfenced)
-- ARGV[2]  the attempt number of that claim
-- ARGV[3]  progress as "current total time"
-- ARGV[4]  longest the events stream may grow (approximate MAXLEN)
-- ARGV[5]  the submission token the claim saw ('' or absent: unchecked); a reused task id has
--          a new one, and a run of the old submission is told it was taken over ('lost')
--
-- Returns the task's state, or 'lost' when another attempt owns it now, or nil when the task's
-- data is gone. 'cancelled' and 'lost' tell the running task to stop.
local cur = redis.call('HMGET', KEYS[1], 'state', 'owner', 'attempt', 'token')
if not cur[1] then
  return nil
end
if ARGV[1] ~= '' and (cur[2] ~= ARGV[1] or cur[3] ~= ARGV[2]) then
  return 'lost'
end
if ARGV[5] and ARGV[5] ~= '' and cur[4] ~= ARGV[5] then
  return 'lost'
end
if cur[1] == 'running' then
  redis.call('HSET', KEYS[1], 'progress', ARGV[3])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'progress', ARGV[3])
  redis.call('PEXPIRE', KEYS[2], math.max(redis.call('PTTL', KEYS[1]), 1000))
end
return cur[1]
