"""Run by test_finetune_parallel.py under torchrun (gloo): ``lf.finetune`` with the settings
given as JSON; ``crash_at`` > 0 ends every process right after that step's checkpoint, as a
kill would."""

import json
import sys

from loraflow.finetune import loop
from loraflow.finetune.config import FinetuneConfig

settings = json.loads(sys.argv[1])
crash_at = settings.pop("crash_at", 0)
if crash_at:
    real = loop._checkpoint

    def crash(out, step, *args):
        real(out, step, *args)
        if step == crash_at:
            raise SystemExit(3)

    loop._checkpoint = crash
loop.finetune(FinetuneConfig(**settings))
