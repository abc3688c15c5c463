"""Run ``loraflow finetune`` and ``kill -9`` it from inside, at one chosen instant of its adapter save.

    python kill_in_save.py KILL_AT RECORD -- finetune arguments...

Every file-system step taken while ``RunFolder.save_outputs`` runs (a rename, an exchange, a
folder removal, an fsync, a hard link, a file opened for writing) is one instant; each is
appended to RECORD as it starts. At the KILL_AT-th (counting from 1) the process sends
itself SIGKILL, so nothing after it runs, not even its clean-up. KILL_AT 0: no kill (a run
that counts the instants).
"""

import builtins
import io
import os
import shutil
import signal
import sys


def main() -> None:
    kill_at, record = int(sys.argv[1]), sys.argv[2]
    args = sys.argv[sys.argv.index("--") + 1 :]

    from loraflow import atomic
    from loraflow.cli import main as cli
    from loraflow.finetune import outputs

    saving, count = False, 0
    log = open(record, "a")  # opened before anything is patched

    def step(name, real):
        def run(*a, **kw):
            nonlocal count
            if saving and (name != "open" or _writes(a, kw)):
                count += 1
                log.write(f"{count} {name}\n")
                log.flush()
                if count == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)

        return run

    for module, attr in ((os, "replace"), (os, "fsync"), (os, "link"), (shutil, "rmtree")):
        setattr(module, attr, step(attr, getattr(module, attr)))
    builtins.open = io.open = step("open", io.open)  # pathlib's write_text goes through io.open
    atomic.exchange = step("exchange", atomic.exchange)
    real_save = outputs.RunFolder.save_outputs

    def save_outputs(self, *a, **kw):
        nonlocal saving
        saving = True
        try:
            return real_save(self, *a, **kw)
        finally:
            saving = False

    outputs.RunFolder.save_outputs = save_outputs
    cli(args)


def _writes(args, kwargs) -> bool:
    mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
    return any(c in mode for c in "wax+")


if __name__ == "__main__":
    main()
