"""The Lua scripts that write new commands to Redis: the add (replacement, the device limit,
a resend of the same call) and the look-up of an add whose reply was lost.

The key layout and the leading arguments every script takes are described in
:mod:`amqp_queue.state.redis_scripts`; the lost-reply protocol in
:mod:`amqp_queue.state.redis_add_doubt`.
"""

from __future__ import annotations

from .redis_lua import PRELUDE

ADD = (
    PRELUDE
    + """
-- KEYS[4]: the sequence counter. ARGV[4]: the most open commands a device may hold.
-- ARGV[5..]: groups of id, device, type ('' for none), payload, requires_confirmation,
-- created_at, expires_at, key TTL (ms), outcome timeout in seconds ('' for none), rollout
-- id ('' for none), enqueued by ('' for none).
-- Returns how many open commands were superseded, or {'full', device} having written
-- nothing when a device would go over its limit (a replacement adds nothing).
local limit = tonumber(ARGV[4])
-- A late copy of an add that was looked up after its reply was lost, and found never to have
-- run: its caller was told nothing was written, so nothing is.
if redis.call('EXISTS', prefix .. 'unwritten:' .. ARGV[5]) == 1 then
    return 0
end
-- A command already held was written by this very call sent before (redis-py resends a
-- command whose reply was lost): it is left as it is, so a resend changes nothing.
local fresh = {}
for i = 5, #ARGV, 11 do
    fresh[i] = redis.call('EXISTS', command_key(ARGV[i])) == 0
end
local added, slot_seen = {}, {}
for i = 5, #ARGV, 11 do
  if fresh[i] then
    local device, kind = ARGV[i + 1], ARGV[i + 2]
    local adds = 1
    if kind ~= '' then
        local slot = device .. '|' .. kind
        if slot_seen[slot] then
            adds = 0
        else
            slot_seen[slot] = true
            local holder = redis.call('HGET', prefix .. 'types:' .. device, kind)
            if holder and is_live(redis.call('HMGET', command_key(holder), 'delivered',
                                             'end_reason', 'expires_at')) then
                adds = 0
            end
        end
    end
    added[device] = (added[device] or 0) + adds
  end
end
for device, adds in pairs(added) do
    local device_key = prefix .. 'dev:' .. device
    if adds > 0 and redis.call('ZCARD', device_key) + adds > limit then
        -- The set may still list expired commands cleanup has not swept: count the live.
        local open = 0
        for _, id in ipairs(redis.call('ZRANGE', device_key, 0, -1)) do
            if is_live(redis.call('HMGET', command_key(id), 'delivered', 'end_reason',
                                  'expires_at')) then
                open = open + 1
            end
        end
        if open + adds > limit then
            return {'full', device}
        end
    end
end
local superseded = 0
for i = 5, #ARGV, 11 do
  if fresh[i] then
    local id, device, kind, payload, needs_ok, created, expires, ttl, wait, rollout, by =
        unpack(ARGV, i, i + 10)
    local seq = redis.call('INCR', KEYS[4])
    local fields = {
        'id', id, 'device_id', device, 'payload', payload,
        'requires_confirmation', needs_ok, 'confirmed', '0', 'delivered', '0',
        'created_at', created, 'expires_at', expires, 'seq', seq,
    }
    if wait ~= '' then
        fields[#fields + 1] = 'outcome_timeout'
        fields[#fields + 1] = wait
    end
    if by ~= '' then
        fields[#fields + 1] = 'enqueued_by'
        fields[#fields + 1] = by
    end
    if rollout ~= '' then
        fields[#fields + 1] = 'rollout_id'
        fields[#fields + 1] = rollout
        local members = prefix .. 'rollout:' .. rollout
        redis.call('ZADD', members, seq, id)
        extend_ttl(members, ttl)
    end
    if kind ~= '' then
        local slots = prefix .. 'types:' .. device
        local previous = redis.call('HGET', slots, kind)
        if previous then
            local previous_key = command_key(previous)
            if is_open(previous_key) then
                local reason = 'superseded'
                local ends = redis.call('HGET', previous_key, 'expires_at')
                if tonumber(ends) <= tonumber(now) then
                    reason = 'expired'
                else
                    superseded = superseded + 1
                end
                finish(previous_key, previous, 'end_reason', reason)
            end
        end
        redis.call('HSET', slots, kind, id)
        extend_ttl(slots, ttl)
        fields[#fields + 1] = 'command_type'
        fields[#fields + 1] = kind
    end
    local key = command_key(id)
    redis.call('HSET', key, unpack(fields))
    redis.call('PEXPIRE', key, ttl)
    local device_key = prefix .. 'dev:' .. device
    redis.call('ZADD', device_key, seq, id)
    extend_ttl(device_key, ttl)
    redis.call('ZADD', expiry_key, expires, id)
    if needs_ok == '0' then
        redis.call('ZADD', outbox_key, created, id)
    else
        redis.call('ZADD', prefix .. 'awaiting', created, id)
    end
    redis.call('ZADD', prefix .. 'devices', 0, device)
    local history = prefix .. 'hist:' .. device
    redis.call('ZADD', history, created, id)
    extend_ttl(history, ttl)
  end
end
return superseded
"""
)

ADD_LOOKUP = (
    PRELUDE
    + """
-- ARGV[4]: how long (ms) a fence is kept; ARGV[5..]: the ids of an add whose reply was lost.
-- Returns how many of them are held. With none held the add never ran, and never will: a
-- fence under its first id makes a late copy of it (sent on a connection the client gave up
-- on while Redis stalled) write nothing, so the "not written" its caller is told stays true.
local held = 0
for i = 5, #ARGV do
    held = held + redis.call('EXISTS', command_key(ARGV[i]))
end
if held == 0 then
    redis.call('SET', prefix .. 'unwritten:' .. ARGV[5], '1', 'PX', ARGV[4])
end
return held
"""
)
