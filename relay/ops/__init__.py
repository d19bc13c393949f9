"""The operator's hands on the queues: what waits where, dead letters, unrouted events (engine-neutral)."""
