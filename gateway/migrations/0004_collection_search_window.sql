-- How long a collection's events stay in the search index (seconds); NULL: the gateway's
-- --search-window-secs default.
ALTER TABLE collections ADD COLUMN search_window_secs BIGINT;
