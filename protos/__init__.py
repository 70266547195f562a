"""The gRPC contract: ``.proto`` sources and the Python stubs generated from them.

Generated files (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``) are committed and never edited by
hand; ``python -m protos.generate`` rewrites them and ``python -m protos.generate --check`` (run by
CI) fails when they differ from the ``.proto`` sources. The generator is pinned (grpcio-tools
1.84.0, the GPU image's grpcio) because a generated ``_pb2_grpc.py`` refuses to import under a
grpcio older than the generator.
"""
