"""A study of normalization layers (BatchNorm, LayerNorm, GroupNorm) on one small CIFAR-10 CNN.

One module per concern, each importing only from the ones listed before it:

    stopping    how a command stops on Ctrl-C or SIGTERM (one line, exit 130 or 143); imported first
    runtime     the device, how a run executes (presets fast / fp16 / fp32 / eager) and how the runs
                of one process share a GPU (DEVICE_LOCK)
    data        CIFAR-10 files, checks, device-side augmentation, synthetic data
    divergence  the errors of a run that diverged (a loss or a parameter NaN or infinite)
    fast        the fast path: Triton kernels and their self-check, CUDA-graph steps and epochs,
                SGD without torch.optim
    recipe      the hyper-parameters (units, types, ranges), optimizer, schedule, initialization
    config      RunConfig: a run as a value, its id and its recipe
    models      the one network, parametrized by its norm
    loop        train() and test() for one epoch
    checkpoints atomic files, checkpoints, safe loading
    plots       the figures
    fit         set-up and the epoch loop of one model (FitOptions: how it trains)
    run         run_one(config, out) -> record: the one unit of work
    stack       many runs, one model: train_stack trains runs of one batch size as one network
    report      the one summary schema of a folder of runs, its reader and per-cell table, pure functions
    study_report the study's tables of a summary (Wu & He's Tables 2 and 3; issue 20's questions), pure functions
    summary     the one writer of a folder's summary.json, results.md and figures
    cli         the command line of train.py, and the options it shares with the study
    runners     who executes a list of runs: LocalRunner (this process, threads), a Ray runner
    study       the study's grids (batch size, groups; issue 20's ghost, order, remedies), run_grid,
                `python -m normstudy.study`
    command     the `normstudy` command (train, study, summarize), `python -m normstudy`

Start with :func:`normstudy.run.run_one` and :class:`normstudy.config.RunConfig`.
"""
