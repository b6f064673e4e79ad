"""The Ray Serve deployments: ingress -> retriever -> LLM (see deployments/app.py)."""

from mmrag.deployments.loopback import keep_replica_grpc_on_loopback

keep_replica_grpc_on_loopback()  # in each replica process, before Serve binds its gRPC server
