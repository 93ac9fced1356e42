-- Append what a running task wrote (stdout, stderr) and its new descriptions to its events
-- stream, where watchers read them in order with the task's progress.
--
-- KEYS[1]  hash    the task             <p>|<s>|task-result:<id>
-- KEYS[2]  stream  the task's events    <p>|<s>|task-events:<id>
-- ARGV[1]  the worker id that claimed it ('' when unfenced)
-- ARGV[2]  the attempt number of that claim
-- ARGV[3]  the submission token the claim saw ('' when unchecked)
-- ARGV[4]  longest the events stream may grow (approximate MAXLEN)
-- ARGV[5…] kind, text, kind, text …: one stream entry each, field = kind ('stdout', 'stderr' or
--          'desc'), value = the text
--
-- Returns how many entries were added: 0 when the task's data is gone or another attempt (or
-- a newer submission of the same id) owns it now.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local cur = redis.call('HMGET', KEYS[1], 'owner', 'attempt', 'token')
if ARGV[1] ~= '' and (cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2]) then
  return 0
end
if ARGV[3] ~= '' and cur[3] ~= ARGV[3] then
  return 0
end
local added = 0
for i = 5, #ARGV, 2 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', ARGV[i], ARGV[i + 1])
  added = added + 1
end
if added > 0 then
  redis.call('PEXPIRE', KEYS[2], math.max(redis.call('PTTL', KEYS[1]), 1000))
end
return added
