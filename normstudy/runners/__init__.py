"""Runners execute a list of :class:`~normstudy.config.RunConfig` for :func:`normstudy.study.run_grid`.

Every runner has one method::

    run(configs, *, out, data_dir, download, device, runtime, on_record)

which trains each config into ``out/<run id>/`` (``record.json`` last: it marks the run finished)
and calls ``on_record(record)`` in the calling thread as each run finishes.

    local   :class:`normstudy.runners.local.LocalRunner`: in this process, no Ray needed
    ray     :class:`normstudy.runners.ray.RayRunner`: Ray actors on this machine or a cluster
            (optional: ``pip install -r requirements-ray.txt``)
"""
