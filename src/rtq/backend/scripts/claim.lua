-- Claim a task id that a worker has just moved (BLMOVE or LMOVE) into its in-progress list, and
-- optionally move more queued ids into that list for the worker to claim next (a batch).
--
-- KEYS[1]  hash  the task               <p>|<s>|task-result:<id>
--                (with KEYS[5]: the head <p>|<s>|task-result: the id taken is appended to)
-- KEYS[2]  list  the worker's claims    <p>|<s>|task-running|<worker>
-- KEYS[3]  list  the dead-letter list   <p>|<s>|task-dead: gets an entry for an id that cannot be claimed
-- KEYS[4]  list  the task's queue (optional, with ARGV[5])  <p>|<s>|task-queue|<name>
-- KEYS[5]  list  a landing list (optional)   <p>|<s>|task-landing|<worker>|<n>
-- ARGV[1]  the task id ('' with KEYS[5])
-- ARGV[2]  the worker id
-- ARGV[3]  now, in seconds since the epoch
-- ARGV[4]  the name of the queue the id came from (for the dead-letter entry)
-- ARGV[5]  how many more ids to move from the queue's head into the worker's list (optional;
--          the worker has that many free slots, and claims them with this script next)
--
-- With KEYS[5], the id is the one a BLMOVE sent in the same write just put in that landing
-- list (this script runs right after it, with no round trip between): it moves on into the
-- worker's list and is claimed. Anything else found there was left by a wake-up whose claim
-- never ran (a dropped connection): it goes back to the front of KEYS[4], unclaimed. An empty
-- landing list (the BLMOVE timed out) claims nothing.
--
-- Returns {claim, moved, id}. claim is {attempt, token, expiry, params, params#, name, notify}
-- when the task is now this worker's (everything the worker needs to run it, in this one round
-- trip); false when it was cancelled (its caller knows: nothing more to say); or, when it cannot
-- be claimed, the reason, as text: its data is gone, its deadline passed while queued, it already
-- runs or ended (a duplicate entry), or its record is not one rtq wrote. Such an id is
-- dead-lettered with that reason. Either way a skipped id is dropped from the worker's list.
-- moved lists the further ids now in the worker's list, in queue order; id is the id claimed
-- (false when a landing list was empty).
if KEYS[5] then
  local id = redis.call('LMOVE', KEYS[5], KEYS[2], 'LEFT', 'RIGHT')
  if not id then
    return {false, {}, false}
  end
  while true do
    local stray = redis.call('RPOP', KEYS[5])
    if not stray then
      break
    end
    redis.call('LPUSH', KEYS[4], stray)
  end
  ARGV[1] = id
  KEYS[1] = KEYS[1] .. id
end
local moved = {}
local more = tonumber(ARGV[5] or '0') or 0
if KEYS[4] then
  for i = 1, more do
    local id = redis.call('LMOVE', KEYS[4], KEYS[2], 'LEFT', 'RIGHT')
    if not id then
      break
    end
    moved[i] = id
  end
end
-- One read of everything the claim checks and hands over (each redis.call costs more than the
-- fields it reads).
local cur = redis.call('HMGET', KEYS[1], 'state', 'expiry', 'owner', 'attempt', 'token', 'params', 'params#', 'name', 'notify')
local state = cur[1]
local expiry = tonumber(cur[2] or '0') or 0  -- garbage: expired
if state ~= 'queued' or expiry < tonumber(ARGV[3]) then
  redis.call('LREM', KEYS[2], -1, ARGV[1])
  if state == 'cancelled' then
    return {false, moved, ARGV[1]}
  end
  local reason
  if state == 'queued' then
    reason = 'its deadline passed while it was queued'
  elseif state == 'running' then
    reason = 'it already runs on worker ' .. (cur[3] or '?') .. ' (a second entry of one id)'
  elseif state == 'done' or state == 'failed' then
    reason = 'it already ended (' .. state .. ')'
  elseif state then
    reason = 'its record has the unknown state ' .. state
  elseif redis.call('EXISTS', KEYS[1]) == 1 then
    reason = 'its record has no state: it was not stored by rtq'
  else
    reason = 'its data is gone (expired, deleted, or never stored)'
  end
  local entry = cjson.encode({
    id = ARGV[1], queue = ARGV[4], error = 'could not be claimed: ' .. reason, worker = ARGV[2],
    time = tonumber(ARGV[3])
  })
  redis.call('LPUSH', KEYS[3], entry)
  redis.call('LTRIM', KEYS[3], 0, 9999)
  return {reason, moved, ARGV[1]}
end
local attempt = math.floor(tonumber(cur[4] or '0') or 0) + 1  -- garbage counts as no attempt yet
redis.call('HSET', KEYS[1], 'state', 'running', 'owner', ARGV[2], 'claimed', ARGV[3], 'attempt', attempt)
return {{attempt, cur[5], cur[2], cur[6], cur[7] or '', cur[8] or '', cur[9] or ''}, moved, ARGV[1]}
