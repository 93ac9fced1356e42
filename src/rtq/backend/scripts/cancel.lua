-- Cancel a task: a queued one never runs; a running one is told to stop at its next update.
--
-- KEYS[1]  hash  the task               <p>|<s>|task-result:<id>
-- KEYS[2]  list  the task's queue       <p>|<s>|task-queue|<name>
-- KEYS[3]  list  where to announce the end (the task's done list or a client's inbox)
-- KEYS[4]  stream  the task's events (optional) <p>|<s>|task-events:<id>: gets a 'state' entry
-- ARGV[1]  the task id
-- ARGV[2]  now, in seconds since the epoch
-- ARGV[3]  milliseconds the cancelled state stays readable at least
-- ARGV[4]  '1' to cancel only a queued task (leave a running one alone, as Future.cancel does)
--
-- Returns the state the task was in: 'queued' (it will never run), 'running' (it was asked to
-- stop), another final state (nothing to cancel), or nil when the task is unknown.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and (state ~= 'running' or ARGV[4] == '1') then
  return state
end
if state == 'queued' then
  redis.call('LREM', KEYS[2], 0, ARGV[1])
end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished', ARGV[2])
local keep = tonumber(ARGV[3])
if redis.call('PTTL', KEYS[1]) < keep then
  redis.call('PEXPIRE', KEYS[1], keep)
end
if KEYS[4] then
  redis.call('XADD', KEYS[4], '*', 'state', 'cancelled')
  redis.call('PEXPIRE', KEYS[4], redis.call('PTTL', KEYS[1]))
end
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], keep)
return state
