"""Deprecated alias of `cman.training` (the one training loop); kept so `from cman.engine import fit` still works."""

from cman.training import (  # noqa: F401
    TrainHooks,
    TrainState,
    create_state,
    end_epoch,
    evaluate_checkpoint,
    finish,
    fit,
    make_loader,
    train_one_epoch,
    write_eval,
)
