"""The Lua of a drain's two-phase claim on Redis: the claim, its hand-over, and the end of
claims whose drain seems dead (see :mod:`amqp_queue.state.drain_claims`). The leading
arguments and the key layout are those of :mod:`amqp_queue.state.redis_scripts`."""

from __future__ import annotations

from datetime import timedelta

from .redis_lua import PRELUDE
from .rules import CLAIM_LEASE

CLAIM = (
    PRELUDE
    + f"local CLAIM_LEASE_US = {CLAIM_LEASE // timedelta(microseconds=1)}\n"
    + """
-- KEYS[4]: the device's open set. ARGV[4]: this claim's token; ARGV[5]: how long (ms) its
-- answer is kept; ARGV[6]: '1' to only look the answer up (a claim sent again by a later
-- drain: with no answer it never ran, and claims nothing now); ARGV[7]: how many tokens
-- follow whose answers arrived; then those tokens; then how many claim times follow of
-- claims this drain looked up (its own: not another drain's to stop at); then those times;
-- then the ids to consider (none: all of the device's).
local answer_key = prefix .. 'claim:' .. ARGV[4]
-- rules.claim_until: the lease plus a random part under a second, from the random token.
local jitter = tonumber(string.sub(ARGV[4], 1, 5), 16) % 1000000
local claim_until = string.format('%.0f', tonumber(now) + CLAIM_LEASE_US + jitter)
local answered = tonumber(ARGV[7])
for i = 8, 7 + answered do
    -- Not deleted: emptied, for a minute, so a late copy of that claim (sent on a connection
    -- given up on while Redis stalled) claims nothing.
    redis.call('SET', prefix .. 'claim:' .. ARGV[i], '{}', 'PX', 60000)
end
local earlier = redis.call('GET', answer_key)
if not earlier and ARGV[6] == '1' then
    -- It never ran: should a late copy of it still come, it claims nothing either.
    redis.call('SET', answer_key, '{}', 'PX', ARGV[5])
    return {}
end
if earlier then
    -- The same claim again (its reply was lost): the commands it still holds, not "none
    -- left"; one taken over since (its claim ended by a reader, claimed and handed over by
    -- another drain) is no longer this claim's to hand over or give back.
    local answer = cjson.decode(earlier)
    local held = {}
    for _, id in ipairs(answer['ids'] or {}) do
        local key = command_key(id)
        local f = redis.call('HMGET', key, 'delivered', 'end_reason', 'claimed_until')
        if f[1] == '0' and not f[2] and f[3] == answer['claimed_until'] then
            held[#held + 1] = redis.call('HGETALL', key)
        end
    end
    return held
end
local own_count = tonumber(ARGV[8 + answered])
local own = {}
for i = 9 + answered, 8 + answered + own_count do
    own[tonumber(ARGV[i])] = true
end
local candidates = ARGV
local first = 9 + answered + own_count
local whole = #ARGV < first
if whole then
    candidates = redis.call('ZRANGE', KEYS[4], 0, -1)
    first = 1
end
local claimed, ids = {}, {}
for i = first, #candidates do
    local id = candidates[i]
    if redis.call('ZSCORE', KEYS[4], id) then
        local key = command_key(id)
        local f = redis.call('HMGET', key, 'delivered', 'end_reason', 'requires_confirmation',
                             'confirmed', 'expires_at', 'claimed_until')
        if not f[1] then
            -- The hash outlived its key TTL: drop what still points at it.
            redis.call('ZREM', KEYS[4], id)
            redis.call('ZREM', expiry_key, id)
            redis.call('ZREM', outbox_key, id)
        elseif f[1] == '0' and not f[2] and (f[3] == '0' or f[4] == '1')
                and tonumber(f[5]) > tonumber(now) then
            if not f[6] or tonumber(f[6]) <= tonumber(now) then
                -- Claimed, still open (rules.CLAIM_LEASE): HAND_OVER delivers it.
                redis.call('HSET', key, 'claimed_until', claim_until)
                claimed[#claimed + 1] = redis.call('HGETALL', key)
                ids[#ids + 1] = id
            elseif whole and not own[tonumber(f[6])] then
                -- rules.held_by_a_claim: another drain's; the commands behind it wait.
                break
            end
        end
    end
end
-- With the claim's token; an empty Lua table encodes as {}, which decodes as one again.
redis.call('SET', answer_key, cjson.encode({claimed_until = claim_until, ids = ids}), 'PX', ARGV[5])
return claimed
"""
)

HAND_OVER = (
    PRELUDE
    + """
-- ARGV[4]: the claim's claimed_until; ARGV[5..]: the ids it claimed. rules.handed_over: those
-- still open, unexpired and claimed until then end delivered; returns their ids, and those
-- this claim's hand-over delivered before.
local handed = {}
for i = 5, #ARGV do
    local id = ARGV[i]
    local key = command_key(id)
    local f = redis.call('HMGET', key, 'delivered', 'end_reason', 'expires_at', 'claimed_until')
    if f[1] == '0' and not f[2] and tonumber(f[3]) > tonumber(now) and f[4] == ARGV[4] then
        -- claimed_until stays: a give-back reopens only what a hand-over delivered.
        finish(key, id, 'delivered', '1')
        handed[#handed + 1] = id
    elseif f[1] == '1' and f[4] == ARGV[4] then
        -- Delivered by this claim's hand-over already (a device's mark clears claimed_until):
        -- the same hand-over sent again after its reply was lost answers as it did.
        handed[#handed + 1] = id
    end
end
return handed
"""
)

END_CLAIMS = (
    PRELUDE
    + """
-- ARGV[4..]: command ids. The claims on those open and unexpired end; returns how many.
local ended = 0
for i = 4, #ARGV do
    local key = command_key(ARGV[i])
    local f = redis.call('HMGET', key, 'delivered', 'end_reason', 'expires_at', 'claimed_until')
    if f[1] == '0' and not f[2] and tonumber(f[3]) > tonumber(now) and f[4] then
        redis.call('HDEL', key, 'claimed_until')
        ended = ended + 1
    end
end
return ended
"""
)
