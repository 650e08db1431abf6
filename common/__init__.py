"""Shared machinery of the numbered experiments, one room per concern: config and CLI (config), data,
augmentation (augment), models, the training loop (training), test-time adaptation (tta), a run's life
(lifecycle), the procedures' verbs (experiment), reading runs back (results), the report, figures (plots),
files and processes (plumbing), torchrun (distributed) and the speed comparison (bench).

01-06 call run(cli(CONFIG)); 07-09 write their procedure with the verbs of common.experiment (start,
load_data, new_model, train, test, adapt, finish) and launch(main, cli(CONFIG)). Importing the package
changes no global state.
"""
import os as _os
import signal as _signal
import sys as _sys
import threading as _threading


def _interrupted_while_starting(signum, frame):
    """Ctrl-C while torch and the project import (seconds): one line and exit 130, as later, not a traceback.
    os._exit: a library cut half-way through its import (scipy, numpy) can fail again in the interpreter's
    clean-up, and nothing has run that needs one."""
    _sys.stderr.write("interrupted while starting; nothing was run\n")
    _sys.stderr.flush()
    _os._exit(130)


# Only for the import itself: the previous handler is back before `import common` returns (no global state kept).
_main_thread = _threading.current_thread() is _threading.main_thread()
_previous = _signal.signal(_signal.SIGINT, _interrupted_while_starting) if _main_thread else None
try:
    from .config import AUGMENT_04, CROSS_DOMAIN, Config, cli
    from .errors import UserError
    from .experiment import launch, run
finally:
    if _main_thread:
        _signal.signal(_signal.SIGINT, _previous)

__all__ = ["AUGMENT_04", "CROSS_DOMAIN", "Config", "UserError", "cli", "launch", "run"]
