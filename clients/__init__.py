"""AbdoServe's thin gRPC client: needs only tritonclient[grpc], grpcio and numpy.

    from clients.client import AbdoServeClient        # blocking
    from clients.aio import AsyncAbdoServeClient      # asyncio

Nothing is imported here, so that `abdoserve`'s parser can import `clients.cli`
without loading grpc.
"""
