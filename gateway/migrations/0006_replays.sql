-- Replays (docs/replays.md): what to replay (`spec`, JSON), where it is, and who runs it.
-- `checkpoint_at`/`checkpoint_id` is the last event (in delivery order: received_at, id)
-- whose batch was delivered or dead-lettered; a resumed replay starts after it.
-- `owner`/`lease_until` lease the replay to one gateway; an expired lease lets another
-- gateway (or the same one after a restart) take it over.
CREATE TABLE replays (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    collection_id TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    total BIGINT,
    delivered BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    retried BIGINT NOT NULL,
    checkpoint_at BIGINT,
    checkpoint_id TEXT,
    rate_milli BIGINT NOT NULL,
    error TEXT,
    owner TEXT,
    lease_until BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX replays_team ON replays (team_id, created_at);
CREATE INDEX replays_status ON replays (status);
