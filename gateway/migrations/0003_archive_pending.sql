-- Objects the archiver or compaction is about to write (or has just made obsolete) that must
-- not outlive a crash unless they are registered in archive_files. Each row names the
-- gateway instance that wrote it; a restarted instance removes its own leftovers before its
-- archiver starts, and any instance removes rows older than a few minutes.
CREATE TABLE archive_pending (
    path        TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
