"""How :class:`amqp_queue.state.redis_store.RedisStore` lays out commands in Redis, and its Lua
scripts.

Redis runs a script atomically, so a replacement, a drain, an expiry sweep or an outbox update
is never seen half done by another client or process. The hash encoding both sides agree on
field for field is in :mod:`amqp_queue.state.redis_encoding`; a drain's claim, hand-over and
claim ends are in :mod:`amqp_queue.state.redis_claim_scripts`.

Layout of a store's keys (``P`` is the store's prefix):

- ``P cmd:<id>`` hash: one command (the fields of
  :class:`amqp_queue.state.model.CommandRecord`, times as integer microseconds since the
  epoch, booleans as ``0``/``1``, absent fields for None, plus ``seq``, its write order).
- ``P dev:<device>`` sorted set: the device's open commands, scored by ``seq``.
- ``P types:<device>`` hash: command type -> id of the device's open command of that type.
- ``P expiry`` sorted set: open commands by ``expires_at``.
- ``P outbox`` sorted set: open, ready, unpublished commands by ready time.
- ``P finished`` sorted set: finished commands by ``ended_at`` (what ``prune`` deletes).
- ``P seq`` counter: the write order.
- ``P rollout:<id>`` sorted set: the commands of an ``enqueue_many`` call, scored by ``seq``
  (pruned ones are skipped where it is read).
- ``P outcome_due`` sorted set: delivered commands with an outcome deadline and no outcome
  yet, by deadline; they join ``P finished`` only once they have an outcome.
- ``P awaiting`` sorted set: open commands awaiting confirmation, by ``created_at`` (ties by
  id): the fleet-wide confirmation inbox. A confirmation or an end removes a command.
- ``P devices`` sorted set (all scores 0, so ordered by name): devices with open commands;
  a script that ends a device's last one removes it, and one still listed whose commands
  ended otherwise (a confirm or cancel of one command, or an expiry not swept yet) is
  skipped where it is read.
- ``P hist:<device>`` sorted set: every command of the device still held, by ``created_at``
  (pruned ones leave it).
- ``P unwritten:<id>`` string: a fence, kept ten minutes, under the first id of an add whose
  reply was lost and which was looked up and found never to have run (see
  :mod:`amqp_queue.state.redis_add_doubt`): should that add still arrive, it writes nothing.
- ``P claim:<token>`` string: the ids a drain's claim took, kept ten minutes so the same
  claim sent again after a lost reply answers the same (see
  :mod:`amqp_queue.state.redis_claims`); the store's next claim empties it, for a minute, once
  its reply arrived.
- ``P done:<token>`` string: the answer of a rollout's confirm (its ids, JSON) or cancel, or of
  a retirement (a count), kept ten minutes so the call run again after a lost reply answers the
  same and changes nothing more (see :mod:`amqp_queue.state.redis_rerun`); evicted early (an
  ``allkeys-*`` policy), a rerun counts only what it changed itself.

Every script is called with the same leading arguments: ``KEYS[1..3]`` are the expiry, outbox
and finished sets, ``ARGV[1..3]`` the prefix, the store clock's now and the key TTL of a
finished command in milliseconds. Time always comes from the store's (injectable) clock,
never from Redis ``TIME``. Keys named by a command or device id are built inside the scripts
(a replaced command's id is only known there), so all of a store's keys must live on one
server: a standalone Redis, or a prefix with a hash tag on a cluster.

Times pass through the scripts as the strings the caller sent: Lua would print a number of
16 digits in ``%.14g`` and lose precision. They are compared with ``tonumber``, exact below
2**53 microseconds.
"""

from __future__ import annotations

from .redis_lua import PRELUDE

MARK_DELIVERED = (
    PRELUDE
    + """
-- ARGV[4..]: command ids a device took. rules.taken: an open one, or one cancelled,
-- replaced or expired meanwhile, ends delivered.
local taken_anyway = {superseded = true, cancelled = true, expired = true}
local marked = 0
for i = 4, #ARGV do
    local key = command_key(ARGV[i])
    local state = redis.call('HMGET', key, 'delivered', 'end_reason')
    if state[1] == '0' and (not state[2] or taken_anyway[state[2]]) then
        if state[2] then
            -- Finished already: out of the finished index, to be filed again as delivered.
            redis.call('HDEL', key, 'end_reason')
            redis.call('ZREM', finished_key, ARGV[i])
        end
        -- A device's mark: never reopened by a drain's give-back (rules.taken).
        redis.call('HDEL', key, 'claimed_until')
        finish(key, ARGV[i], 'delivered', '1')
        marked = marked + 1
    end
end
return marked
"""
)

REJECT = (
    PRELUDE
    + """
-- ARGV[4..]: command ids the outbox could not hand on, for good. Returns how many open ones ended.
local rejected = 0
for i = 4, #ARGV do
    local key = command_key(ARGV[i])
    if is_open(key) then
        finish(key, ARGV[i], 'end_reason', 'rejected')
        rejected = rejected + 1
    end
end
return rejected
"""
)

EXPIRE = (
    PRELUDE
    + """
-- ARGV[4]: how many to look at in this call (the caller loops, so Redis is never blocked
-- for long). Returns {ended, examined}.
local ids = redis.call('ZRANGEBYSCORE', expiry_key, '-inf', now, 'LIMIT', 0, ARGV[4])
local ended = 0
for _, id in ipairs(ids) do
    local key = command_key(id)
    if is_open(key) then
        finish(key, id, 'end_reason', 'expired')
        ended = ended + 1
    else
        redis.call('ZREM', expiry_key, id)
        redis.call('ZREM', outbox_key, id)
    end
end
return {ended, #ids}
"""
)

PRUNE = (
    PRELUDE
    + """
-- ARGV[4]: prune what ended before this time (exclusive); ARGV[5]: batch size.
-- Returns {deleted, examined}.
local ids = redis.call('ZRANGEBYSCORE', finished_key, '-inf', '(' .. ARGV[4], 'LIMIT', 0, ARGV[5])
local deleted = 0
for _, id in ipairs(ids) do
    local device = redis.call('HGET', command_key(id), 'device_id')
    if device then
        redis.call('ZREM', prefix .. 'hist:' .. device, id)
    end
    deleted = deleted + redis.call('DEL', command_key(id))
    redis.call('ZREM', finished_key, id)
end
return {deleted, #ids}
"""
)

OPEN_COMMANDS = (
    PRELUDE
    + """
-- KEYS[4]: the device's open set. Read-only: one consistent snapshot of the device's queue.
local found = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    local key = command_key(id)
    local f = redis.call('HMGET', key, 'delivered', 'end_reason', 'expires_at')
    if f[1] == '0' and not f[2] and tonumber(f[3]) > tonumber(now) then
        found[#found + 1] = redis.call('HGETALL', key)
    end
end
return found
"""
)

UNPUBLISHED = (
    PRELUDE
    + """
-- ARGV[4]: limit. Read-only. Walks the outbox in ready order, skipping expired commands,
-- and returns at least `limit` (when there are so many) plus every tie of the last ready
-- time, so the caller can break ties by write order.
local limit = tonumber(ARGV[4])
local found = {}
local last_score = nil
local start = 0
while true do
    local chunk = redis.call('ZRANGE', outbox_key, start, start + 99, 'WITHSCORES')
    if #chunk == 0 then
        return found
    end
    for i = 1, #chunk, 2 do
        local id, score = chunk[i], chunk[i + 1]
        if #found >= limit and score ~= last_score then
            return found
        end
        local key = command_key(id)
        local f = redis.call('HMGET', key, 'delivered', 'end_reason', 'expires_at')
        if f[1] == '0' and not f[2] and tonumber(f[3]) > tonumber(now) then
            found[#found + 1] = redis.call('HGETALL', key)
            last_score = score
        end
    end
    start = start + 100
end
"""
)

MARK_PUBLISHED = (
    PRELUDE
    + """
-- ARGV[4..]: command ids. A pruned command is not brought back as a stub hash.
for i = 4, #ARGV do
    local key = command_key(ARGV[i])
    if redis.call('EXISTS', key) == 1 then
        redis.call('HSET', key, 'published_at', now)
    end
    redis.call('ZREM', outbox_key, ARGV[i])
end
return 0
"""
)


RELEASE = (
    PRELUDE
    + """
-- ARGV[4]: '1' when the commands are to be published again; ARGV[5]: retention plus margin
-- in ms (a reopened command's key lives that long past its expiry). ARGV[6..]: pairs of an
-- id and the claimed_until of the claim giving it back (only what that claim holds or handed
-- over goes back). Returns how many commands are open again.
local unpublish, keep = ARGV[4] == '1', tonumber(ARGV[5])
local reopened = 0
for i = 6, #ARGV, 2 do
    local id, claim = ARGV[i], ARGV[i + 1]
    local key = command_key(id)
    local f = redis.call('HMGET', key, 'delivered', 'end_reason', 'device_id', 'command_type',
                         'expires_at', 'seq', 'requires_confirmation', 'confirmed',
                         'confirmed_at', 'created_at', 'published_at', 'outcome',
                         'claimed_until')
    if f[1] == '0' and not f[2] and f[13] == claim then
        -- Claimed and still open: the claim ends, the command never left the open indexes
        -- (expired, it is not counted: the expiry sweep ends it).
        if tonumber(f[5]) > tonumber(now) then
            reopened = reopened + 1
        end
        redis.call('HDEL', key, 'claimed_until')
        if unpublish then
            redis.call('HDEL', key, 'published_at')
            if f[7] == '0' or f[8] == '1' then
                redis.call('ZADD', outbox_key, f[9] or f[10], id)
            end
        end
    -- An outcome is proof the device took the command: such a one is never given back; nor
    -- is one a device's mark delivered (no claim: rules.given_back_delivered).
    elseif f[1] == '1' and not f[2] and not f[12] and f[13] == claim then
        redis.call('HDEL', key, 'claimed_until')
        local device, kind, expires = f[3], f[4], f[5]
        local slots = prefix .. 'types:' .. device
        local taken = false
        if kind then
            local holder = redis.call('HGET', slots, kind)
            taken = holder and holder ~= id and is_open(command_key(holder))
        end
        local expired = tonumber(expires) <= tonumber(now)
        if expired or taken then
            -- Ended, not delivered: no outcome is awaited, and pruning finds it as any other
            -- finished command.
            local reason = expired and 'expired' or 'superseded'
            redis.call('HSET', key, 'delivered', '0', 'end_reason', reason, 'ended_at', now)
            redis.call('ZREM', prefix .. 'outcome_due', id)
            redis.call('ZADD', finished_key, now, id)
            redis.call('PEXPIRE', key, finished_ttl)
            keep_listed(key, finished_ttl)
        else
            reopened = reopened + 1
            redis.call('HSET', key, 'delivered', '0')
            redis.call('HDEL', key, 'ended_at')
            local published = f[11]
            if unpublish then
                redis.call('HDEL', key, 'published_at')
                published = false
            end
            local device_key = prefix .. 'dev:' .. device
            redis.call('ZADD', device_key, f[6], id)
            -- Its claim's finish took the device out of the fleet's list if this was its last.
            redis.call('ZADD', prefix .. 'devices', 0, device)
            redis.call('ZADD', expiry_key, expires, id)
            redis.call('ZREM', finished_key, id)
            redis.call('ZREM', prefix .. 'outcome_due', id)
            if kind then
                redis.call('HSET', slots, kind, id)
            end
            if not published and (f[7] == '0' or f[8] == '1') then
                redis.call('ZADD', outbox_key, f[9] or f[10], id)
            end
            local ttl = math.floor((tonumber(expires) - tonumber(now)) / 1000) + keep
            redis.call('PEXPIRE', key, ttl)
            keep_listed(key, ttl)
            extend_ttl(device_key, ttl)
            if kind then
                extend_ttl(slots, ttl)
            end
        end
    end
end
return reopened
"""
)

# No PRELUDE: one key of its own. Times are the store's clock, as everywhere else, not the
# server's. Returns 1 when ARGV[1] holds the lease (until ARGV[3]), 0 when another does past
# ARGV[2].
RELAY_LEASE = """
local lease = redis.call('HMGET', KEYS[1], 'holder', 'until')
if lease[1] and lease[1] ~= ARGV[1] and tonumber(lease[2]) > tonumber(ARGV[2]) then
    return 0
end
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'until', ARGV[3])
return 1
"""
