"""What every Lua script of :class:`~amqp_queue.state.redis_store.RedisStore` shares: the
leading arguments and helpers (see :mod:`amqp_queue.state.redis_scripts` for the key layout).
"""

from __future__ import annotations

SWEEP_BATCH = 500
"""How many commands one call of a sweep script (expiry, pruning, deadlines) looks at: sweeps
run in slices so one script never blocks Redis for long."""

PRELUDE = """
local prefix, now, finished_ttl = ARGV[1], ARGV[2], ARGV[3]
local expiry_key, outbox_key, finished_key = KEYS[1], KEYS[2], KEYS[3]

local function command_key(id)
    return prefix .. 'cmd:' .. id
end

local function is_open(key)
    local state = redis.call('HMGET', key, 'delivered', 'end_reason')
    return state[1] == '0' and not state[2]
end

local function is_live(f)
    return f[1] == '0' and not f[2] and tonumber(f[3]) > tonumber(now)
end

-- An index key must outlive every command it lists, so its TTL only ever grows.
local function extend_ttl(key, ttl)
    if redis.call('PTTL', key) < tonumber(ttl) then
        redis.call('PEXPIRE', key, ttl)
    end
end

-- A command's key given a longer life (delivered awaiting its outcome, finished late, an
-- outcome reported) keeps its device's history and its rollout listing it as long.
local function keep_listed(key, ttl)
    local owner = redis.call('HMGET', key, 'device_id', 'rollout_id')
    if owner[1] then
        extend_ttl(prefix .. 'hist:' .. owner[1], ttl)
    end
    if owner[2] then
        extend_ttl(prefix .. 'rollout:' .. owner[2], ttl)
    end
end

-- A finished command leaves every open index and stays queryable until pruned. A delivered
-- one with an outcome deadline waits in outcome_due instead: it is not final yet.
local function finish(key, id, field, value)
    local owner = redis.call('HMGET', key, 'device_id', 'command_type', 'outcome_timeout')
    redis.call('HSET', key, field, value, 'ended_at', now)
    local device_key = prefix .. 'dev:' .. owner[1]
    redis.call('ZREM', device_key, id)
    if redis.call('ZCARD', device_key) == 0 then
        -- No open command left: the device leaves the list of devices with open ones.
        redis.call('ZREM', prefix .. 'devices', owner[1])
    end
    redis.call('ZREM', expiry_key, id)
    redis.call('ZREM', outbox_key, id)
    redis.call('ZREM', prefix .. 'awaiting', id)
    if owner[2] then
        local slots = prefix .. 'types:' .. owner[1]
        if redis.call('HGET', slots, owner[2]) == id then
            redis.call('HDEL', slots, owner[2])
        end
    end
    if field == 'delivered' and owner[3] then
        local wait = math.ceil(tonumber(owner[3]) * 1000000)
        redis.call('ZADD', prefix .. 'outcome_due', string.format('%.0f', tonumber(now) + wait), id)
        local ttl = tonumber(finished_ttl) + math.ceil(wait / 1000)
        redis.call('PEXPIRE', key, ttl)
        keep_listed(key, ttl)
    else
        redis.call('ZADD', finished_key, now, id)
        redis.call('PEXPIRE', key, finished_ttl)
        keep_listed(key, finished_ttl)
    end
end


-- The records (HGETALL replies) of the ids in a JSON list still held: what a call kept as
-- its answer, asked again after its reply was lost (pruned commands are left out).
local function held_records(ids_json)
    local records = {}
    for _, id in ipairs(cjson.decode(ids_json)) do
        local record = redis.call('HGETALL', command_key(id))
        if #record > 0 then
            records[#records + 1] = record
        end
    end
    return records
end
"""


EXTEND_TTLS = """
-- Every key in KEYS given at least ARGV[1] ms to live: an index key's TTL only grows. (PEXPIRE's
-- GT option does this in one command, from Redis 7.0 only.)
for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < tonumber(ARGV[1]) then
        redis.call('PEXPIRE', key, ARGV[1])
    end
end
return 0
"""
