-- One beat of a worker's heartbeat helper: keep the worker's lease (and its listener markers)
-- alive, or end the lease at once when the helper saw the worker die.
--
-- KEYS[1]    string  the worker's record    <p>|<s>|worker:<worker>   (expires with the lease)
-- KEYS[2]    zset    live workers           <p>|<s>|workers           (score: when the lease ends)
-- KEYS[3…]   string  listener markers       <p>|<s>|task-listen|<name>
-- ARGV[1]  the worker id
-- ARGV[2]  'serve' (lease and markers), 'drain' (lease only: the worker takes no new tasks),
--          or 'dead' (the worker process is gone: end its lease now so its tasks are requeued)
-- ARGV[3]  the lease in milliseconds
-- ARGV[4]  when the lease ends, in seconds since the epoch
-- ARGV[5]  how long a listener marker lives, in milliseconds
-- ARGV[6]  the record (JSON) to store when the worker's record is missing (first beat, or after
--          a Redis restart); an existing record is only given more time, since the worker itself
--          writes the richer one
--
-- Returns 1 when the lease is live, 0 when it was ended.
if ARGV[2] == 'dead' then
  redis.call('DEL', KEYS[1])
  redis.call('ZADD', KEYS[2], 'XX', 0, ARGV[1])
  return 0
end
if redis.call('PEXPIRE', KEYS[1], ARGV[3]) == 0 then
  redis.call('SET', KEYS[1], ARGV[6], 'PX', ARGV[3])
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
if ARGV[2] == 'serve' then
  for i = 3, #KEYS do
    redis.call('SET', KEYS[i], '1', 'PX', ARGV[5])
  end
end
return 1
