-- Uploaded WASM plugins (content-addressed: the component is stored in the object store under
-- plugins/<team>/<sha256>.wasm) and the destinations that use them.
CREATE TABLE plugins (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (team_id, name, version)
);

CREATE TABLE destinations (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    name TEXT NOT NULL,
    plugin_id TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (team_id, name)
);

-- A collection's ingest-time pipeline: an ordered JSON list of steps
-- [{"plugin_id", "plugin", "config", "limits"}].
CREATE TABLE pipelines (
    collection_id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    steps TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Webhook ingress: POST /v1/hooks/<id> runs an ingress plugin and stores its events in a
-- collection. The id is the secret part of the public URL.
CREATE TABLE hooks (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL,
    name TEXT NOT NULL,
    plugin_id TEXT NOT NULL,
    collection_id TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (team_id, name)
);
