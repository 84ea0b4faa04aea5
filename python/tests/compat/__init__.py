"""The cross-language contract suite: our Python backend against the Go ingestion peer."""
