"""Which backend holds which block: believed from routing (`prefix_index`), known from KV events (`kv_events`)."""
