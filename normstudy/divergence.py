"""A run that diverged: the errors that say where (a loss, or a parameter or buffer, gone NaN or
infinite). Raised by the plain loop (:mod:`normstudy.loop`), the graph epoch
(:mod:`normstudy.fast.graph_epoch`), :mod:`normstudy.fit` and stacks alike; the commands exit 3
on them (both are ``FloatingPointError``)."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; ``batch`` is the first such batch (0-based)."""

    def __init__(self, batch, epoch=None):
        self.batch, self.epoch = batch, epoch
        where = f"epoch {epoch}, batch {batch}" if epoch is not None else f"batch {batch}"
        super().__init__(f"loss is NaN or infinite at {where}; lower the learning rate")


class NonFiniteStateError(FloatingPointError):
    """A parameter or buffer (e.g. BatchNorm's running variance) became NaN or infinite."""

    def __init__(self, name, epoch):
        self.name, self.epoch = name, epoch
        super().__init__(f"{name} is NaN or infinite after epoch {epoch}; lower the learning rate")
