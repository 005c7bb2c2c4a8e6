"""Toy ServerApp for the Flower launch test (Message API, push/pull with our own polling).

Run-config keys (all in the toy pyproject.toml):
  result-path (str)   JSON file the server writes its observations to ("" = don't write)
  num-nodes (int)     how many SuperNodes to wait for before sending
  fail (bool)         raise right after start (to prove failed runs are detected)
  wait-nodes-s (float) how long to wait for num-nodes nodes
  reply-timeout-s (float) how long to wait for replies
  array-size (int)    length of the float32 array sent to each node
  rounds (int)        how many TRAIN rounds to run
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.time()
    cfg = context.run_config
    if cfg["fail"]:
        raise RuntimeError("toy ServerApp asked to fail")
    result: dict = {"server-start-wall": started, "pid": os.getpid(), "run-config": dict(cfg), "rounds": []}

    deadline = time.monotonic() + float(cfg["wait-nodes-s"])
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= int(cfg["num-nodes"]):
            break
        time.sleep(0.2)
    result["nodes"] = [str(n) for n in nodes]
    result["nodes-wait-s"] = time.time() - started

    w = np.zeros(int(cfg["array-size"]), dtype=np.float32)
    for rnd in range(1, int(cfg["rounds"]) + 1):
        msgs = [
            Message(
                RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "config": ConfigRecord({"round": rnd})}),
                dst_node_id=n,
                message_type=MessageType.TRAIN,
                group_id=str(rnd),
                ttl=float(cfg["reply-timeout-s"]) + 30.0,
            )
            for n in nodes
        ]
        t_push = time.time()
        pending = set(grid.push_messages(msgs))
        t_pushed = time.time()
        replies = []
        deadline = time.monotonic() + float(cfg["reply-timeout-s"])
        while pending and time.monotonic() < deadline:
            for rep in grid.pull_messages(list(pending)):
                pending.discard(rep.metadata.reply_to_message_id)
                if rep.has_error():
                    replies.append({"error": rep.error.reason, "src": str(rep.metadata.src_node_id)})
                    continue
                arr = rep.content.array_records["arrays"]["w"].numpy()
                m = rep.content.metric_records["metrics"]
                c = rep.content.config_records["info"]
                replies.append(
                    {
                        "src": str(rep.metadata.src_node_id),
                        "group": rep.metadata.group_id,
                        "array-ok": bool(np.allclose(arr, w + 1.0)),
                        "recv-wall": time.time(),
                        "metrics": dict(m),
                        "info": dict(c),
                    }
                )
            if pending:
                time.sleep(0.1)
        result["rounds"].append(
            {"round": rnd, "push-wall": t_push, "push-s": t_pushed - t_push, "replies": replies,
             "missing": len(pending)}
        )
        w = w + 1.0
    result["server-end-wall"] = time.time()
    path = cfg["result-path"]
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, path)
