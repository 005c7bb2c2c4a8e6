"""Toy ClientApp for the Flower launch test: returns the array + 1 and a MetricRecord."""

from __future__ import annotations

import os
import time

import psutil
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    now = time.time()
    proc_start = psutil.Process().create_time()
    w = msg.content.array_records["arrays"]["w"].numpy()
    calls = int(context.state.config_records.get("toy", ConfigRecord({"calls": 0}))["calls"]) + 1
    context.state.config_records["toy"] = ConfigRecord({"calls": calls})
    metrics = MetricRecord(
        {
            "partition-id": int(context.node_config.get("partition-id", -1)),
            "num-examples": 10,
            "proc-start-to-train-s": now - proc_start,
            "calls-in-context": calls,
        }
    )
    info = ConfigRecord(
        {
            "node-id": str(context.node_id),
            "pid": os.getpid(),
            "train-wall": now,
            "proc-start-wall": proc_start,
            "env-marker": os.environ.get("PILOT_TOY_MARKER", ""),
            "run-config-array-size": int(context.run_config["array-size"]),
            "node-config-keys": ",".join(sorted(context.node_config)),
        }
    )
    content = RecordDict({"arrays": ArrayRecord({"w": Array(w + 1.0)}), "metrics": metrics, "info": info})
    return Message(content, reply_to=msg)
