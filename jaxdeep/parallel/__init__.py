"""Parallelism beyond the sharding rules: pipeline stages and schedules, collective matmul, hierarchical
reductions. See README.md in this folder."""
