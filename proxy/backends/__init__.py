"""What the proxy knows of each backend: the registry, in-flight work, scraped load, the circuit breaker.

Pure state the deciders (routing/) and the senders (upstream/) read and update; it imports neither.
"""
