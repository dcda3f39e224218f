"""The pure core: policies, keys, keyspace, entry codec, HTTP semantics, breaker, decide(); no I/O."""
