"""The span store: every drained span kept in the Go backend's schema (DuckDB, PostgreSQL)."""
