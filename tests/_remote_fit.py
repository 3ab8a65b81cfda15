"""A fit whose run directory is a URL, in a process of its own, for tests/test_remote.py.

    python -m tests._remote_fit RUN_URL HOLD_AT

Trains as tests/test_resume.py's setup (checkpoints every 2 steps in RUN_URL/ck, every step logged by the CSV
and JSONL loggers in RUN_URL). With HOLD_AT > 0, the checkpoint of step HOLD_AT is written (its files) but,
before its manifest is, the process prints ``committing`` and waits: the test kills it there (kill -9).
"""

import sys
import time

import fnlight
from fnlight.train import checkpoint_remote
from fnlight.train.loggers import CSVLogger, JSONLLogger
from tests.test_resume import setup

url, hold_at = sys.argv[1], int(sys.argv[2])
real_commit = checkpoint_remote.commit


def held_commit(path, known=None):
    if path.name == f"step_{hold_at:09d}":
        print("committing", flush=True)
        time.sleep(120)
    return real_commit(path, known)


checkpoint_remote.commit = held_commit


def trainer(run: str) -> fnlight.Trainer:
    return fnlight.Trainer(max_epochs=4, run_dir=run, ckpt_dir=f"{run}/ck", ckpt_every_n_steps=2,
                           log_every_n_steps=1, loggers=(CSVLogger(), JSONLLogger()))


if __name__ == "__main__":
    dm, state, step, eval_step = setup()
    result = trainer(url).fit(state, step, dm, eval_step)
    print(f"finished resumed_from={result.resumed_from}", flush=True)
