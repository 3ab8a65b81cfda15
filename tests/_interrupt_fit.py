"""A fit in a process of its own, for the signal tests in test_lifecycle.py.

    python -m tests._interrupt_fit DIR BLOCK_AT MODE

At step BLOCK_AT it prints ``ready`` and waits until the file ``DIR/go`` exists (the test sends its signal
first, so the signal arrives during that step). MODE: ``sync``, ``async`` (background checkpoint writes),
``off`` (``handle_signals=()``) or ``slowsave`` (each checkpoint file's fsync after BLOCK_AT prints
``saving`` and sleeps, so that a second signal arrives while a checkpoint is being written).
"""

import signal
import sys
import time
from pathlib import Path

import fnlight
from fnlight.train import Interrupted, checkpoint_files
from tests.test_resume import setup

d, block_at, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
blocked = False


def on_step(s, m):
    global blocked
    if int(s.step) == block_at:
        print("ready", flush=True)
        deadline = time.monotonic() + 60
        while not (d / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        blocked = True


if mode == "slowsave":
    real_fsync = checkpoint_files.fsync

    def slow_fsync(path):
        if blocked:
            print("saving", flush=True)
            time.sleep(60)
        real_fsync(path)

    checkpoint_files.fsync = slow_fsync

dm, state, step, eval_step = setup()
callbacks = (fnlight.EarlyStopping("val/loss", patience=100), fnlight.LambdaCallback(on_step=on_step))
trainer = fnlight.Trainer(max_epochs=4, run_dir=d / "run", ckpt_dir=d / "ck", callbacks=callbacks,
                          loggers=(fnlight.train.CSVLogger(),), async_save=mode == "async",
                          **({"handle_signals": ()} if mode == "off" else {}))
try:
    result = trainer.fit(state, step, dm, eval_step)
except Interrupted as e:
    restored = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    print(f"interrupted {e.signal.name} step={e.step} epoch={e.epoch} position={e.position} "
          f"checkpoint={e.checkpoint} handlers_restored={restored}", flush=True)
    sys.exit(e.exit_code)
fnlight.save_checkpoint(d / "final", result.state, meta={"history": result.history})
print("finished", flush=True)
