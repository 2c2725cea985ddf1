r"""Train until the training loss has plateaued: :class:`PlateauLR` (``--schedule plateau``).

A fixed budget leaves open whether a comparison was made before the training loss stopped
falling.  This schedule makes the plateau the stopping rule itself.  With the mean training
loss :math:`L_e` of epoch :math:`e`, the loss has *plateaued at the current rate* when the
last ``window + 1`` epochs were all trained at that rate and

.. math:: |L_e - L_{e-w}| \,/\, L_{e-w} < \text{tol} \qquad (w = \text{window}).

Each plateau divides the learning rate by ``1/factor`` (10 by default), as in the step
schedules of He et al. (2016); the plateau reached after ``decays`` divisions ends the run.
The number of epochs therefore differs between runs; ``--epochs`` is the most a run may
take, and a run that reaches it without the last plateau is reported as not plateaued.

This is :class:`torch.optim.lr_scheduler.ReduceLROnPlateau`'s idea with two differences that
matter for a reported criterion: the test is the stated relative change over a fixed window
(not "no improvement on the best value for ``patience`` epochs"), and the scheduler says when
to stop.  The per-step :meth:`step` keeps the rate of the current level, so the training loop
steps it like every other schedule.
"""

from __future__ import annotations

import math

from torch.optim import lr_scheduler as lrs

__all__ = ["PlateauLR", "relative_change"]


def relative_change(losses: list[float], window: int) -> float:
    r""":math:`|L_{-1} - L_{-1-w}| / |L_{-1-w}|` of the last ``window + 1`` values (``nan``
    if there are fewer; ``inf`` if the earlier value is 0)."""
    if len(losses) <= window:
        return math.nan
    a, b = float(losses[-1 - window]), float(losses[-1])
    return abs(b - a) / abs(a) if a else math.inf


class PlateauLR(lrs.LRScheduler):
    r"""Learning rate :math:`\lambda_0\,\text{factor}^k` after the :math:`k`-th plateau of the
    training loss; the run is over at the plateau after ``decays`` divisions.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    tol : float
        Relative change of the epoch-mean training loss over ``window`` epochs below which
        the loss has plateaued; in (0, 1).
    window : int
        Epochs over which the change is measured (``window + 1`` epochs at one rate are
        needed before a plateau can be declared); ``>= 1``.
    decays : int
        Number of rate divisions before the final plateau; ``>= 0`` (0: stop at the first).
    factor : float
        Multiplier of the rate at each plateau; in (0, 1).
    last_epoch : int
        As in :class:`torch.optim.lr_scheduler.LRScheduler` (counts steps here).

    Examples
    --------
    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> s = PlateauLR(opt, tol=0.02, window=3, decays=1)
    >>> [s.epoch_end(loss) for loss in (1.0, 0.9, 0.8, 0.7, 0.7, 0.699, 0.698)]
    [False, False, False, False, False, False, False]
    >>> s.level, round(opt.param_groups[0]["lr"], 6)
    (1, 0.01)
    >>> [s.epoch_end(loss) for loss in (0.6, 0.599, 0.598, 0.597)]
    [False, False, False, True]
    """

    def __init__(self, optimizer, tol: float = 0.02, window: int = 3, decays: int = 2,
                 factor: float = 0.1, last_epoch: int = -1):
        if not (0 < tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if not (isinstance(decays, int) and decays >= 0):
            raise ValueError(f"decays must be an integer >= 0, got {decays!r}")
        if not (0 < factor < 1):
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        self.tol, self.window, self.decays, self.factor = float(tol), window, decays, factor
        #: divisions so far
        self.level = 0
        #: epoch-mean training losses at the current rate
        self.level_losses: list[float] = []
        #: epochs seen, and the epochs after which the rate was divided
        self.epochs_seen = 0
        self.decay_epochs: list[int] = []
        #: the final plateau has been reached: the run is over
        self.converged = False
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        f = self.factor ** self.level
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self):
        return self.get_lr()

    def epoch_end(self, train_loss: float) -> bool:
        """Record an epoch's mean training loss; divide the rate at a plateau.

        Returns
        -------
        bool
            ``True`` once the final plateau is reached (stop training).
        """
        if self.converged:
            return True
        self.epochs_seen += 1
        self.level_losses.append(float(train_loss))
        if not relative_change(self.level_losses, self.window) < self.tol:
            return False
        if self.level >= self.decays:
            self.converged = True
            return True
        self.level += 1
        self.level_losses = []
        self.decay_epochs.append(self.epochs_seen)
        # the next epoch's first step must already use the new rate
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr
        return False

    def describe(self) -> dict:
        """The criterion and what happened, for a run's summary."""
        return {"tol": self.tol, "window": self.window, "decays": self.decays,
                "factor": self.factor, "converged": self.converged,
                "decay_epochs": list(self.decay_epochs), "epochs": self.epochs_seen}
