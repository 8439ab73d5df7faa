"""Lesson harness: workers for spawned processes, the tutorial's pitfalls, sweeps. The mechanism never imports it."""
