"""A Flower Grid whose nodes are threads running the real trainer ClientApp in this process.

Used by integration tests of the coordinator/trainer round logic: everything
is real (Redis, ledger, bus, model, codec, checkpoints) except the transport,
which Flower's SuperLink replaces in the end-to-end tests. A node can be made
to fail (raise), hang (never reply), or send a corrupted update.
"""

from __future__ import annotations

import threading
import traceback
import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from services.trainer.client_app import app as trainer_app

Tamper = Callable[[Message], Message]


class InProcessGrid(Grid):
    def __init__(self, node_ids: list[int], node_configs: dict[int, dict] | None = None) -> None:
        self.nodes = list(node_ids)
        self.node_configs = node_configs or {}
        self.replies: dict[str, Message] = {}
        self.lock = threading.Lock()
        self.hang: set[int] = set()
        self.tamper: dict[int, Tamper] = {}
        self.sent: list[Message] = []
        # what Flower sets in a ServerApp process before main() runs
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    # --- Grid API used by the coordinator ---------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.sent.append(message)
            ids.append(message.metadata.message_id)
            threading.Thread(target=self._serve, args=(message,), daemon=True).start()
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        with self.lock:
            ready = [self.replies.pop(mid) for mid in list(self.replies) if mid in wanted]
        return ready

    def _serve(self, message: Message) -> None:
        node = message.metadata.dst_node_id
        if node in self.hang:
            return
        context = Context(run_id=1, node_id=node, node_config=self.node_configs.get(node, {}),
                          state=RecordDict(), run_config={})
        try:
            reply = trainer_app(message, context)
        except Exception as exc:  # what Flower does: an error reply
            traceback.print_exc()
            reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
        if node in self.tamper:
            reply = self.tamper[node](reply)
        with self.lock:
            self.replies[message.metadata.message_id] = reply

    # --- unused parts of the abstract Grid -------------------------------------------
    def set_run(self, run_id: int) -> None:  # pragma: no cover
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        ids = list(self.push_messages(messages))
        deadline = time.monotonic() + (timeout or 1e9)
        out: list[Message] = []
        while len(out) < len(ids) and time.monotonic() < deadline:
            out.extend(self.pull_messages(ids))
            time.sleep(0.05)
        return out
