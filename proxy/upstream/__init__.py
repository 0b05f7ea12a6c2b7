"""Every call to a backend: the keep-alive HTTP/1.1 client, the forwarder (attempts, failover,
streaming, drain), health checks and metric scrapes, a backend's /tokenize, and `ResponseSink`, the
interface the forwarder writes an answer to."""
