"""Dynamic loss scaling for fp16 autocast, with every decision on the device.

fp16 has five exponent bits: small gradients underflow to zero unless the loss is multiplied by a
large factor before backward (and the gradients divided by it after). The factor is dynamic, as
in ``torch.amp.GradScaler``: halved whenever a gradient overflows (and that step skipped), doubled
after 2000 steps in a row without overflow. bf16 has fp32's exponent range and needs none of this.

``GradScaler`` decides whether to skip a step on the host (``found_inf.item()``), which a CUDA
graph cannot record. :class:`LossScaler` keeps the scale, its growth tracker and the overflow flag
as device tensors and hands the flag to the optimizer (:meth:`normstudy.fast.optimizers.SGD.step`
with ``found_inf``), which turns a step with an overflow into a no-op arithmetically: the same
kernels run, nothing is read back, and :class:`normstudy.fast.steps.CudaGraphStep` records it as it
is. :class:`~normstudy.fast.steps.EagerStep` runs the very same calls.
"""
import collections

import torch


class LossScaler:
    """The loss scale of fp16 training and the step that skips on overflow.

    ``scale(loss)`` before backward, then ``step(optimizer)``: unscale the gradients and check
    them (:meth:`unscale_and_check`), step the optimizer unless one overflowed, update the scale
    (:meth:`update`). Defaults are ``torch.amp.GradScaler``'s.
    """

    def __init__(self, device, *, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        if not (growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1 and init_scale > 0):
            raise ValueError("LossScaler needs growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1 "
                             "and init_scale > 0")
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        # Fixed tensors, updated in place: a recorded CUDA graph reads and writes these very ones.
        self.factor = torch.full((), float(init_scale), dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)

    def scale(self, loss):
        """``loss`` times the current scale (backward this one)."""
        return loss * self.factor

    def unscale_and_check(self, optimizer):
        """Divide every gradient of ``optimizer``'s parameters by the scale, in place, and return
        ``found_inf``: a 0-d device tensor, 1.0 if some gradient is infinite or NaN, else 0.0."""
        self.found_inf.zero_()
        inv_scale = self.factor.double().reciprocal().float()  # as GradScaler: exact for powers of two
        groups = collections.defaultdict(list)  # the check takes tensors of one dtype at a time
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.device != self.found_inf.device:
                        raise ValueError(f"LossScaler on {self.found_inf.device} got a gradient on {p.grad.device}")
                    groups[p.grad.dtype].append(p.grad)
        for grads in groups.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, inv_scale)
        return self.found_inf

    def update(self):
        """Halve the scale after an overflow (and restart the count), double it after
        ``growth_interval`` steps in a row without one; on the device."""
        torch._amp_update_scale_(self.factor, self.growth_tracker, self.found_inf,
                                 self.growth_factor, self.backoff_factor, self.growth_interval)

    def step(self, optimizer):
        """Unscale and check the gradients, step ``optimizer`` (a no-op on overflow), update the
        scale. ``optimizer.step`` must take ``found_inf`` (:class:`normstudy.fast.optimizers.SGD`)."""
        found_inf = self.unscale_and_check(optimizer)
        optimizer.step(found_inf=found_inf)
        self.update()
        return found_inf

    def get_scale(self):
        """The current scale as a float (reads it back from the device)."""
        return float(self.factor)

    def state_dict(self):
        return {"scale": float(self.factor), "growth_tracker": int(self.growth_tracker),
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval}

    def load_state_dict(self, state):
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.factor.fill_(float(state["scale"]))  # in place, as everything a graph reads
        self.growth_tracker.fill_(int(state["growth_tracker"]))

    def tensors(self):
        """The state that a step changes (the CUDA-graph step snapshots and restores it)."""
        return {"factor": self.factor, "growth_tracker": self.growth_tracker, "found_inf": self.found_inf}
