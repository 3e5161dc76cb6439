from types import SimpleNamespace

import pytest

from moco_lightning.eval.cadence import is_monitor_epoch
from moco_lightning.eval.knn import KNNMonitor, monitor_every_n_epochs


def _trainer(callbacks=(), epoch=0, max_epochs=10):
    return SimpleNamespace(callbacks=list(callbacks), current_epoch=epoch, max_epochs=max_epochs, sanity_checking=False)


def test_monitors_follow_the_knn_monitor_unless_given_their_own_cadence():
    trainer = _trainer([KNNMonitor(every_n_epochs=3)])
    assert monitor_every_n_epochs(trainer) == 3
    assert monitor_every_n_epochs(trainer, 2) == 2
    assert [e + 1 for e in range(10) if is_monitor_epoch(_trainer(epoch=e), monitor_every_n_epochs(trainer))] == \
        [3, 6, 9, 10]


def test_without_a_knn_monitor_they_run_after_the_last_epoch_only():
    assert monitor_every_n_epochs(_trainer()) is None
    assert [e + 1 for e in range(10) if is_monitor_epoch(_trainer(epoch=e), monitor_every_n_epochs(_trainer()))] == [10]


def test_cadence_must_be_positive():
    with pytest.raises(ValueError, match="every_n_epochs"):
        monitor_every_n_epochs(_trainer(), 0)
