"""The span poller: one leader drains the WAL into a sink behind a fenced checkpoint."""
