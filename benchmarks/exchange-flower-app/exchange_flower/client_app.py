"""A stock ClientApp: return the received arrays, each entry moved by 1e-3, and a number of examples."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The arrays back, slightly changed (in place, as a local step would write them)."""
    del context
    received = msg.content.array_records["arrays"]
    changed = {}
    for name, array in received.items():
        values = array.numpy()
        values += np.asarray(1e-3, dtype=values.dtype)
        changed[name] = Array(values)
    content = RecordDict({"arrays": ArrayRecord(changed), "metrics": MetricRecord({"num-examples": 16})})
    return Message(content=content, reply_to=msg)
