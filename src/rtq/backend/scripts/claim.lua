-- Claim a task id that a worker has just moved (BLMOVE or LMOVE) into its in-progress list, and
-- optionally move more queued ids into that list for the worker to claim next (a batch).
--
-- KEYS[1]  hash  the task               <p>|<s>|task-result:<id>
-- KEYS[2]  list  the worker's claims    <p>|<s>|task-running|<worker>
-- KEYS[3]  list  the task's queue (optional, with ARGV[4])  <p>|<s>|task-queue|<name>
-- ARGV[1]  the task id
-- ARGV[2]  the worker id
-- ARGV[3]  now, in seconds since the epoch
-- ARGV[4]  how many more ids to move from the queue's head into the worker's list (optional;
--          the worker has that many free slots, and claims them with this script next)
--
-- Returns {claim, moved}. claim is {attempt, token, expiry, params, params#, name, notify} when
-- the task is now this worker's (everything the worker needs to run it, in this one round trip),
-- or false when it must be skipped (its data expired, it was cancelled or it already ended; a
-- skipped id is dropped from the worker's list). moved lists the further ids now in the
-- worker's list, in queue order.
local moved = {}
local more = tonumber(ARGV[4] or '0') or 0
if KEYS[3] then
  for i = 1, more do
    local id = redis.call('LMOVE', KEYS[3], KEYS[2], 'LEFT', 'RIGHT')
    if not id then
      break
    end
    moved[i] = id
  end
end
local state = redis.call('HGET', KEYS[1], 'state')
local expiry = tonumber(redis.call('HGET', KEYS[1], 'expiry') or '0') or 0  -- garbage: expired
if state ~= 'queued' or expiry < tonumber(ARGV[3]) then
  redis.call('LREM', KEYS[2], -1, ARGV[1])
  return {false, moved}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'owner', ARGV[2], 'claimed', ARGV[3])
local data = redis.call('HMGET', KEYS[1], 'token', 'expiry', 'params', 'params#', 'name', 'notify')
return {{attempt, data[1], data[2], data[3], data[4] or '', data[5] or '', data[6] or ''}, moved}
