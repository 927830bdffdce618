-- The archive: the manifest of registered Parquet files, the archiver's checkpoint per
-- collection (registered in the same transaction as the files), and each collection's
-- inferred columns with their history.
CREATE TABLE archive_files (
    id               TEXT PRIMARY KEY,
    team_id          TEXT NOT NULL,
    collection_id    TEXT NOT NULL,
    path             TEXT NOT NULL UNIQUE,
    rows             BIGINT NOT NULL,
    bytes            BIGINT NOT NULL,
    min_received_at  BIGINT NOT NULL,
    max_received_at  BIGINT NOT NULL,
    min_position     BIGINT NOT NULL,
    max_position     BIGINT NOT NULL,
    schema_version   BIGINT NOT NULL,
    created_at       BIGINT NOT NULL
);
CREATE INDEX archive_files_by_time ON archive_files (collection_id, min_received_at);

CREATE TABLE archive_checkpoints (
    collection_id  TEXT PRIMARY KEY,
    position       BIGINT NOT NULL
);

CREATE TABLE collection_columns (
    collection_id  TEXT NOT NULL,
    name           TEXT NOT NULL,
    type           TEXT NOT NULL,
    first_seen     BIGINT NOT NULL,
    -- When the type last widened, and from what.
    widened_at     BIGINT,
    widened_from   TEXT,
    PRIMARY KEY (collection_id, name)
);
