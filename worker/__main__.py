"""``python -m worker``: one worker process with settings from the environment."""

from __future__ import annotations

import logging

from core.settings import Settings
from worker.main import run_worker

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_worker(Settings())
