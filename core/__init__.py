"""The shared core: config, store, prompts and answers, modes, registry, upstream types.

Everything else sits on it; it imports nothing above it (see tests/test_layering.py).
"""
