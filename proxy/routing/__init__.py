"""The decision: prompt -> block hashes -> policy -> in-flight bookkeeping. No HTTP.

`router.Router` is the face; `prompt_walk` reads a prompt only as far as a backend can match it,
over `tokenize_cache`; `policies/` are the deciders behind one interface with a registry.
"""
