-- Store a task's outcome, unless the caller of this script no longer owns the task (fencing).
--
-- KEYS[1]  hash    the task               <p>|<s>|task-result:<id>
-- KEYS[2]  list    the worker's claims    <p>|<s>|task-running|<worker>
-- KEYS[3]  list    where to announce the end (the task's done list or a client's inbox)
-- KEYS[4]  stream  the task's events      <p>|<s>|task-events:<id>: gets a 'state' entry
-- KEYS[5]  list    the dead-letter list   <p>|<s>|task-dead: gets ARGV[8] when it is not ''
-- KEYS[6…] string  the outcome's big frames <p>|<s>|task-result:<id>|<field>.<tag>.<i>, written
--          right before this call in the same transaction: deleted when the outcome is discarded
-- ARGV[1]  the task id
-- ARGV[2]  the worker id that claimed it
-- ARGV[3]  the attempt number of that claim
-- ARGV[4]  the final state: 'done' or 'failed'
-- ARGV[5]  now, in seconds since the epoch
-- ARGV[6]  milliseconds the outcome stays readable at least
-- ARGV[7]  the submission token the claim saw ('' to skip that check): a reused task id gets a
--          new token, so a run of the old submission can never finish the new one
-- ARGV[8]  the dead-letter entry (JSON) to add once the outcome is stored, or '' for none
-- ARGV[9…] field, value, field, value … to store (result or error payload; a payload's extra
--          frames are written by the worker with a plain HSET or SETs right before this call,
--          in the same transaction)
--
-- Returns 1 when stored; 0 when discarded because another attempt, a cancel or an expiry
-- overtook this one (the id leaves the worker's list either way).
--
-- The first write is the LREM, which needs no memory: a full Redis (maxmemory) lets a script
-- write on once it wrote, so a small outcome (a failure saying the result was refused) is
-- stored even then.
redis.call('LREM', KEYS[2], -1, ARGV[1])

local function discard()
  -- A discarded outcome's big frames would otherwise stay until they expire, minutes on.
  for i = 6, #KEYS, 1000 do
    redis.call('DEL', unpack(KEYS, i, math.min(i + 999, #KEYS)))
  end
  return 0
end

local cur = redis.call('HMGET', KEYS[1], 'state', 'owner', 'attempt', 'token')
if not cur[1] then
  -- No record (flushed, restarted, expired): what is there now is what the worker wrote just
  -- before this call, an HSET of small frames re-creating the hash, which would never expire.
  redis.call('DEL', KEYS[1])
  return discard()
end
if cur[1] ~= 'running' or cur[2] ~= ARGV[2] or cur[3] ~= ARGV[3] then
  return discard()
end
if ARGV[7] ~= '' and cur[4] ~= ARGV[7] then
  return discard()
end
if ARGV[3] ~= '1' then
  -- An earlier attempt's outcome (stored, then requeued): the first attempt of a submission
  -- has none (submit.lua wrote its record afresh).
  redis.call('HDEL', KEYS[1], 'result', 'result#', 'error', 'error#', 'error_text')
end
redis.call('HSET', KEYS[1], 'state', ARGV[4], 'finished', ARGV[5], unpack(ARGV, 9))
local keep = tonumber(ARGV[6])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < keep then
  redis.call('PEXPIRE', KEYS[1], keep)
  ttl = keep
end
-- After the last output and progress entries, before the caller is woken: a watcher that
-- reads up to this entry has seen everything the task wrote.
redis.call('XADD', KEYS[4], '*', 'state', ARGV[4])
redis.call('PEXPIRE', KEYS[4], ttl)
if ARGV[8] ~= '' then
  redis.call('LPUSH', KEYS[5], ARGV[8])
  redis.call('LTRIM', KEYS[5], 0, 9999)
end
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], keep)
return 1
