"""TensorBoard event files for a run (``--tensorboard``): the same numbers as
``history.jsonl``, for people who already watch runs in TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

# Scalar tags, one place: the test and the docs read them from here.
TAGS = {
    "train-loss": "loss/train",
    "eval-loss": "loss/eval",
    "eval-perplexity": "eval/perplexity",
    "eval-token-accuracy": "eval/token_accuracy",
    "bytes-sent": "traffic/MB_sent",
    "bytes-received": "traffic/MB_received",
    "mb-total": "traffic/MB_total",
    "epsilon": "privacy/epsilon",
    "client-epsilon": "privacy/client_epsilon",
}
CLIENT_TAG = "client_train_loss/{client}"  # client: see client_label


class TensorBoardLog:
    """One SummaryWriter under RUN_DIR/tensorboard, step = server round."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, row: dict, clients: list[dict]) -> None:
        step = int(row["round"])
        for key, tag in TAGS.items():
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue  # round 0 has no train loss or traffic
            self.writer.add_scalar(tag, value / 1e6 if key.startswith("bytes") else value, step)
        for client in clients:
            if "train-loss" in client:
                tag = CLIENT_TAG.format(client=client_label(client))
                self.writer.add_scalar(tag, client["train-loss"], step)
        # Flush every round: the server process may be killed, not closed, when the run ends.
        self.writer.flush()


def client_label(client: dict) -> str:
    """'partition-0' when the client reported its partition, else its Flower node id."""
    if "partition-id" in client:
        return f"partition-{int(client['partition-id'])}"
    return f"node-{client.get('node-id', '?')}"
