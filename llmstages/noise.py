"""Known upstream noise, filtered once for every use of llmstages (the CLI, benchmarks, notebooks).

Only messages that say nothing about the run are dropped: Lightning's "💡 Tip"
advertisements for its cloud products, logged on every `Trainer` built. This
module imports nothing heavy: it attaches a `logging.Filter` to Lightning's
logger names, which works before and after Lightning is imported.
"""

from __future__ import annotations

import logging

LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
TIP_PREFIX = "💡 Tip"


class DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(TIP_PREFIX)


def install() -> None:
    """Attach the filters (idempotent)."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropLightningTips) for f in logger.filters):
            logger.addFilter(DropLightningTips())
