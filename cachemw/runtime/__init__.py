"""What both shells share: the runtime, supervisor, single-flight, refresh, invalidation, metrics, access log."""
