"""Tests of the ingestion client, the span poller and `spans tail` (and the fake they use)."""
