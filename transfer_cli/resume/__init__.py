"""Resuming a run exactly: which checkpoint, its config, what makes the continuation replay the original."""
