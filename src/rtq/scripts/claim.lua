-- Claim a task id that a worker has just moved (BLMOVE) into its in-progress list.
--
-- KEYS[1]  hash  the task               <p>|<s>|task-result:<id>
-- KEYS[2]  list  the worker's claims    <p>|<s>|task-running|<worker>
-- ARGV[1]  the task id
-- ARGV[2]  the worker id
-- ARGV[3]  now, in seconds since the epoch
--
-- Returns {attempt, token, expiry, params, params#} when the task is now this worker's, or nil
-- when it must be skipped (its data expired, it was cancelled or it already ended); a skipped id
-- is dropped from the worker's list.
local state = redis.call('HGET', KEYS[1], 'state')
local expiry = tonumber(redis.call('HGET', KEYS[1], 'expiry') or '0') or 0  -- garbage: expired
if state ~= 'queued' or expiry < tonumber(ARGV[3]) then
  redis.call('LREM', KEYS[2], -1, ARGV[1])
  return nil
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'owner', ARGV[2], 'claimed', ARGV[3])
local data = redis.call('HMGET', KEYS[1], 'token', 'expiry', 'params', 'params#')
return {attempt, data[1], data[2], data[3], data[4] or ''}
