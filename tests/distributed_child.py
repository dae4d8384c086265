"""`flaxvision train ...` as one process of a multi-process test run, recording which examples it reads.

    python tests/distributed_child.py READS_FILE train --run-dir ... --coordinator ... --process-id I ...

Nothing is replaced: the CLI runs as users run it (its supervisor re-runs this same script). The only addition
observes the data pipeline: every training batch this process builds appends its (batch number, source
positions) to READS_FILE.<pid>.jsonl, so the test can check that each process read only its slice; and
FLAXVISION_TEST_BATCH_DELAY (seconds per training batch) paces a run that a test kills midway.
"""

from __future__ import annotations

import json
import os
import sys
import time

from flaxvision.data import pipeline


def _record_reads(path: str) -> None:
    original = pipeline._BatchMaker.__call__
    delay = float(os.environ.get("FLAXVISION_TEST_BATCH_DELAY", "0"))

    def call(self, g):
        if self.augment is not None:  # training batches (eval reads are checked by the eval counts)
            positions, _ = self.rows(g)
            with open(f"{path}.{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps({"shard": list(self.shard), "g": int(g), "positions": positions.tolist()}) + "\n")
            time.sleep(delay)
        return original(self, g)

    pipeline._BatchMaker.__call__ = call


if __name__ == "__main__":
    _record_reads(sys.argv[1])
    from flaxvision.cli import main

    sys.exit(main(sys.argv[2:]))
