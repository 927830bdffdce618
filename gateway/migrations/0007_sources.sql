-- Sources: a subscription the gateway keeps on a team's own message bus (NATS), whose
-- messages an ingress plugin turns into events of a collection.
CREATE TABLE sources (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    name TEXT NOT NULL,
    plugin_id TEXT NOT NULL,
    collection_id TEXT NOT NULL,
    config TEXT NOT NULL,
    url TEXT NOT NULL,
    subject TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (team_id, name)
);
