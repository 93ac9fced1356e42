-- Store a task and queue its id in one step, replacing an earlier task of the same id; with a
-- listener marker given, only when a listener marks the queue (TaskExecutePolicy.Auto).
--
-- KEYS[1]  hash    the task             <p>|<s>|task-result:<id>
-- KEYS[2]  list    the task's done list <p>|<s>|task-done:<id>
-- KEYS[3]  stream  the task's events    <p>|<s>|task-events:<id>
-- KEYS[4]  list    the task's queue     <p>|<s>|task-queue|<name>
-- KEYS[5]  string  the queue's listener marker (optional) <p>|<s>|task-listen|<name>
-- ARGV[1]  the task id
-- ARGV[2]  the task's deadline, in milliseconds since the epoch (the record expires then)
-- ARGV[3…] field, value, field, value … of the task's record (small: payloads with extra
--          frames are stored with plain commands instead, not copied through Lua)
--
-- Returns 1 when the task is queued, or {1, params#, result#, error#} when the record it replaced
-- listed big frames under keys of their own; 0 when KEYS[5] was given and no listener marks the
-- queue (then nothing was written).
if KEYS[5] and redis.call('EXISTS', KEYS[5]) == 0 then
  return 0
end
-- A full Redis (maxmemory reached) refuses a script's commands that need memory only until the
-- script's first write: after the DEL below the HSET would go through past the limit. Queue
-- first, so a full Redis refuses the whole submission and nothing is written (within this one
-- atomic step the order is otherwise invisible).
redis.call('RPUSH', KEYS[4], ARGV[1])
-- A reused id starts clean: no stale result, notification or event leaks into the new run.
-- Big frames of the old record live under keys of their own: their lists go back to the caller,
-- which deletes them (this script cannot name keys it was not given).
local lists = redis.call('HMGET', KEYS[1], 'params#', 'result#', 'error#')
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
for _, listed in ipairs(lists) do
  if listed and string.find(listed, ' keys', 1, true) then
    return {1, lists[1] or '', lists[2] or '', lists[3] or ''}
  end
end
return 1
