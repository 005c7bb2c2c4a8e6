"""Generated protobuf + gRPC code for the pilot.v1 schemas (proto/pilot/v1).

Do not edit: regenerate with `.venv/bin/python scripts/gen_proto.py` (or `make proto`).
"""
