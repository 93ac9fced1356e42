-- Remove what a task left in Redis once its caller has read the outcome (Executor futures,
-- query(..., once=True)): nothing of a consumed task outlives the few seconds a late watcher of
-- its events needs.
--
-- KEYS[1]    hash    the task                 <p>|<s>|task-result:<id>
-- KEYS[2]    stream  the task's events        <p>|<s>|task-events:<id>
-- KEYS[3]    list    the task's done list     <p>|<s>|task-done:<id>
-- KEYS[4…]   string  the big frames its record listed   <p>|<s>|task-result:<id>|<frame>
-- ARGV[1]    milliseconds a stream holding more than the final 'state' entry stays readable
--
-- A stream holding only the 'state' entry (a task that reported nothing: no output, no
-- progress) carries nothing the future does not already know, and goes at once: a no-op task
-- leaves no trace. Returns the number of keys removed.
local removed = redis.call('UNLINK', KEYS[1], KEYS[3], unpack(KEYS, 4))
if redis.call('XLEN', KEYS[2]) <= 1 then
  removed = removed + redis.call('UNLINK', KEYS[2])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return removed
