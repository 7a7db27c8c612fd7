"""The seed's helper names, kept for the notebooks and for whoever imported them:
:func:`GetCorrectPredCount`, :func:`train`, :func:`test` and :func:`printTrainTest_LossAcc`.

They live in the package (:mod:`normstudy.loop`, :mod:`normstudy.plots`); this file only gives
them their old names. Unlike the seed's, ``train`` and ``test`` return the epoch's mean loss and
accuracy and keep no module-level lists: the caller keeps the history.
"""
from normstudy.loop import GetCorrectPredCount, NonFiniteLossError, predict, test, train  # noqa: F401
from normstudy.plots import (find_misclassified, plot_comparison, plot_misclassified,  # noqa: F401
                             show_images, show_misclassified)
from normstudy.plots import loss_accuracy_curves as printTrainTest_LossAcc  # noqa: F401
