"""The client side: bytes in, checks, parsing, the answer out (everything that speaks HTTP to clients)."""
