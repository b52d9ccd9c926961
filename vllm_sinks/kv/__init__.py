"""The SINKS KV policy: the spec and its manager, eviction order, capacity, block-id rows, read-only views."""
