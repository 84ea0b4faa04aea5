"""What the tests, the demo and the benchmarks share to run things: the Go peer, ports, waits.

Importable without pytest. Scripts and benchmarks run as files put this folder's parent on
`sys.path` first (see `python/scripts/demo.py`); pytest finds it from `python/`.
"""
