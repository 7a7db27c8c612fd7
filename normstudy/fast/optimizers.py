"""SGD with Nesterov momentum and a per-step learning-rate schedule, written without torch.optim.

Why: building any ``torch.optim.Optimizer`` imports ``torch._dynamo`` (its ``add_param_group`` is
wrapped in ``torch._disable_dynamo``, which imports it on first call). On the H100 machine that
import alone took 4.4-4.9 s, as long as twenty epochs of training (benchmarks/NOTES.md).

:class:`SGD` computes what ``torch.optim.SGD(..., nesterov=True)`` computes, and
:class:`LambdaSchedule` what ``torch.optim.lr_scheduler.LambdaLR`` does; the tests compare them
step by step. Both keep the interface the training loops and checkpoints use: ``param_groups``
(with ``"lr"``), ``state``, ``zero_grad``, ``step``, ``state_dict`` and ``load_state_dict``.
"""
import torch


class SGD:
    """Stochastic gradient descent with (Nesterov) momentum and per-group L2 weight decay.

    ``params`` is an iterable of tensors or of dicts with ``"params"`` and optionally
    ``"weight_decay"``, as for ``torch.optim.SGD``; a group's ``"weight_decay"`` may also be a
    list of tensors, one per parameter, broadcast against it (a stack of runs, each with its
    own decay over its slice of the parameter). A group's ``"lr"`` may be a float or a
    0-d tensor (a CUDA graph reads it from the tensor; :class:`LambdaSchedule` fills it in place).
    Momentum buffers start at zero, which for SGD is the same as PyTorch's "copy the first
    gradient", and means a CUDA graph can be recorded before the first step.
    """

    def __init__(self, params, *, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        params = list(params)
        if not params:
            raise ValueError("SGD got no parameters")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.nesterov = momentum, nesterov
        self.param_groups = [{"lr": lr, "weight_decay": weight_decay, **group, "params": list(group["params"])}
                             for group in params]
        self.state = {p: {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}
                      for group in self.param_groups for p in group["params"]} if momentum else {}

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self, found_inf=None):
        """One step. ``found_inf`` (fp16 loss scaling, :class:`normstudy.fast.amp.LossScaler`): a 0-d
        float tensor on the parameters' device, 1.0 when some gradient overflowed. Then the step
        changes nothing, neither parameters nor momentum buffers, decided by arithmetic on the
        device rather than by reading the flag back, so that a CUDA graph can record it: the
        gradients are zeroed (in place) when the flag is set, the momentum factor becomes 1 and
        the learning rate 0. With the flag at 0.0 the result is ``step()``'s, bit for bit.
        """
        if found_inf is not None:
            skip = found_inf > 0
            keep = 1 - found_inf  # multiplies the learning rate: 0 on a skipped step
            momentum = found_inf * (1 - self.momentum) + self.momentum  # 1 on a skipped step
        # The same sequence of foreach operations as torch.optim.SGD's foreach implementation.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            decay = group["weight_decay"]
            if isinstance(decay, (list, tuple)):  # one tensor per parameter: a stack of runs, each its own decay
                kept = [d for p, d in zip(group["params"], decay) if p.grad is not None]
                grads = torch._foreach_add(grads, torch._foreach_mul(params, kept))
            elif decay:
                grads = torch._foreach_add(grads, params, alpha=decay)
            if found_inf is not None:
                for grad in grads:  # inf or NaN times 0 is NaN: overwrite instead
                    grad.masked_fill_(skip, 0.0)
            if self.momentum:
                buffers = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(buffers, self.momentum if found_inf is None else momentum)
                torch._foreach_add_(buffers, grads)
                if self.nesterov:
                    grads = torch._foreach_add(grads, buffers, alpha=self.momentum)
                else:
                    grads = buffers
            lr = group["lr"]
            if found_inf is not None:  # times 1 is exact: an unskipped step is step()'s
                if torch.is_tensor(lr):
                    lr = lr * keep
                else:
                    grads = torch._foreach_mul(grads, keep)
            if torch.is_tensor(lr):
                torch._foreach_add_(params, torch._foreach_mul(grads, lr), alpha=-1)
            else:
                torch._foreach_add_(params, grads, alpha=-lr)

    def state_dict(self):
        """Parameters by index, as ``torch.optim`` writes them (learning rates as floats)."""
        index = {p: i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        groups = [{**{k: (float(v) if k == "lr" else v) for k, v in group.items() if k != "params"},
                   "momentum": self.momentum, "nesterov": self.nesterov,
                   "params": [index[p] for p in group["params"]]} for group in self.param_groups]
        return {"state": {index[p]: {k: v.clone() for k, v in s.items()} for p, s in self.state.items()},
                "param_groups": groups}

    def load_state_dict(self, state_dict):
        ours = [p for group in self.param_groups for p in group["params"]]
        theirs = state_dict["param_groups"]
        if [len(g["params"]) for g in theirs] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state has other parameter groups than this optimizer")
        with torch.no_grad():
            for group, saved in zip(self.param_groups, theirs):
                _set_lr(group, saved["lr"])
                group["weight_decay"] = saved["weight_decay"]
            for i, saved in state_dict["state"].items():
                if "momentum_buffer" in saved and saved["momentum_buffer"] is not None:
                    self.state[ours[int(i)]]["momentum_buffer"].copy_(saved["momentum_buffer"])


def _set_lr(group, value):
    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(value)  # in place: a recorded CUDA graph reads this very tensor
    else:
        group["lr"] = float(value)


class LambdaSchedule:
    """Learning rate = each group's initial rate times ``factor(step)``, ``step`` counting
    :meth:`step` calls from 0 (``torch.optim.lr_scheduler.LambdaLR``, stepped once per batch)."""

    def __init__(self, optimizer, factor):
        self.optimizer, self.factor = optimizer, factor
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.last_epoch = 0  # LambdaLR's name for the number of steps taken
        self._apply()

    def _apply(self):
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            _set_lr(group, base * self.factor(self.last_epoch))

    def step(self):
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self):
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def state_dict(self):
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict):
        self.base_lrs = [float(lr) for lr in state_dict["base_lrs"]]
        self.last_epoch = int(state_dict["last_epoch"])
        self._apply()
