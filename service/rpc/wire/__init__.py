"""gRPC's transport, owned: HTTP/2 framing (RFC 9113), header compression (RFC 7541, decoded by
the ``hpack`` package) and gRPC's message framing over it, on the server's asyncio event loop.

NOTE: grpcio's asyncio server cost 3-5x foldserve's whole HTTP/1.1 request path per call here,
most of it in handing the GIL between its threads and the loop (docs/performance.md); this layer
runs in the loop's thread alone, as the HTTP/1.1 layer (service.http) does.
"""
