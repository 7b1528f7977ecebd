"""foldserve's own HTTP/1.1 server: connections, limits, timeouts and the drain, over httptools.

Why our own (issue 17): every bound the project promises (header size and count, body bytes as
sent and as decoded, a request's time to arrive, health probes answered past the connection limit,
a drain that answers everything accepted) lives in the connection layer; uvicorn offers few of
them, and adding them meant subclassing its private internals. Here the layer is small and ours:
``connection`` parses and enforces, ``server`` listens and drains, ``request``/``response`` are the
two types every route sees, and ``asgi`` runs the FastAPI routes (health, models, metrics, docs).
"""
