"""The recipes' entry point and the callbacks every recipe attaches."""

from __future__ import annotations

import signal
import sys
import threading

from .errors import RecipeError


def run_main(main):
    """Entry point: run ``main()``, turning a RecipeError into one line on stderr (``error: ...``) and exit status 2.

    SIGTERM (a scheduler's stop, ``kill``) exits through Python like Ctrl-C does, so the output directory is put back
    as it was when the run had not started training yet (see `output_dir.OutputDir`)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main()
        _finish_distributed()
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (the same command resumes from the newest checkpoint, if one was saved)", file=sys.stderr)
        sys.exit(130)


def _finish_distributed() -> None:
    """A finished multi-process run: wait for every process (the main one may still be writing the model and its
    card), then close the process group. A process that exits while the group is alive can abort in gloo's teardown
    ("terminate called without an active exception", SIGABRT), failing a run whose work was all done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def attach_callbacks(trainer, options, output_dir=None, training_type: str = "fine-tuning") -> None:
    """The recipes' callbacks, in one place: the output directory's (the earlier run is deleted once training has
    started) and efficiency tracking (on by default) first in line, so the loggers see its keys. SAT's callback is
    added by the trainer itself when Litespark runs with a SAT omission rate. ``training_type`` ("pre-training" or
    "fine-tuning") goes to the card's ``co2_eq_emissions``."""
    if output_dir is not None:
        trainer.add_callback(output_dir.callback())
    if options.track_efficiency:
        from litespark_hf.efficiency import track_efficiency

        track_efficiency(trainer, country_iso_code=options.energy_country_iso_code, training_type=training_type)
