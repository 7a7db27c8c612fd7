"""One optimizer step on one batch, two ways: plainly (any device) or replayed as a CUDA graph.

Both take a batch of normalized images and their labels and return the batch's loss and number
of correct predictions as device tensors, so that the caller never has to wait for the GPU.

:class:`CudaGraphStep` records forward, backward and ``optimizer.step()`` once per batch size
(an epoch of 50,000 images at 512 has two: 512 and 336) and then replays the recording: one
launch per step instead of a few hundred. Its learning rate must be a tensor (``fit.Training``
makes it one) so that a scheduler can change it between replays. Runs themselves replay whole
epochs (:mod:`normstudy.fast.graph_epoch`, which also makes recording safe beside other runs in
threads); this single-step graph serves the start-up benchmark, in one thread.

With fp16 autocast both steps scale the loss (:class:`normstudy.fast.amp.LossScaler`): backward of
the scaled loss, then the scaler's step, which skips the optimizer step on an overflow by
arithmetic on the device. The graph records the same calls as the eager step makes.
"""
import contextlib

import torch

from .amp import LossScaler


def correct_count(logits, labels):
    """Number of rows of ``logits`` whose arg-max is the label, as a device tensor. For a stack
    of K runs (labels ``(N, K)``, logits ``(N, K * classes)``): each run's count, shape ``(K,)``."""
    if labels.dim() == 2:
        return (logits.view(*labels.shape, -1).argmax(dim=2) == labels).sum(dim=0)
    return (logits.argmax(dim=1) == labels).sum()


def autocast(device_type, dtype):
    """Mixed precision in ``dtype`` (e.g. ``torch.bfloat16``), or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


class EagerStep:
    """The textbook step: zero grads, forward, loss, backward, optimizer step.

    ``scaler``: the :class:`~normstudy.fast.amp.LossScaler` of an fp16 run; with ``amp_dtype``
    ``torch.float16`` and none given, the step makes its own (fp16 gradients need one).
    """

    def __init__(self, model, optimizer, criterion, *, amp_dtype=None, channels_last=False, compile=False,
                 scaler=None):
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.amp_dtype = amp_dtype
        if scaler is None and amp_dtype == torch.float16:
            scaler = LossScaler(next(model.parameters()).device)
        self.scaler = scaler
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Compiled for the first batch size only, with static shapes: an epoch's one smaller last
        # batch runs uncompiled rather than pay a second compilation (~9 s on the H100 machine),
        # and evaluation calls ``model`` itself.
        # ``compile`` is True (inductor's default mode) or the name of a torch.compile mode.
        options = {"mode": compile} if isinstance(compile, str) else {}
        self.compiled = torch.compile(model, dynamic=False, fullgraph=True, **options) if compile else None
        self.compiled_batch_size = None

    def forward(self, images):
        if self.compiled is not None:
            self.compiled_batch_size = self.compiled_batch_size or len(images)
            if len(images) == self.compiled_batch_size:
                return self.compiled(images)
        return self.model(images)

    def forward_backward(self, images, labels):
        with autocast(images.device.type, self.amp_dtype):
            logits = self.forward(images)
            loss = self.criterion(logits, labels)
        # A stack's criterion gives each run's loss; their sum trains each run on its own.
        total = loss.sum() if loss.dim() else loss
        if self.scaler is None:
            total.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)  # no step, and a smaller scale, if a gradient overflowed
        return loss.detach(), correct_count(logits.detach(), labels)

    def __call__(self, images, labels):
        self.optimizer.zero_grad(set_to_none=True)
        return self.forward_backward(images.contiguous(memory_format=self.memory_format), labels)


class CudaGraphStep(EagerStep):
    """:class:`EagerStep` recorded as a CUDA graph per batch size and replayed.

    Recording runs a few warm-up steps (they load and pick the kernels, and a ``torch.optim``
    optimizer creates its momentum buffers in them); the model, its buffers, the optimizer state
    and the loss scale are restored afterwards, so the training trajectory is the same as if
    recording had cost nothing.
    """

    def __init__(self, model, optimizer, criterion, *, amp_dtype=torch.bfloat16, channels_last=False,
                 compile=False, scaler=None, warmup_steps=3):
        super().__init__(model, optimizer, criterion, amp_dtype=amp_dtype, channels_last=channels_last,
                         compile=compile, scaler=scaler)
        self.warmup_steps = warmup_steps
        self.graphs = {}  # batch size -> (graph, static images, static labels, static loss, static correct)

    def _snapshot(self):
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optim_state = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                       for p, s in self.optimizer.state.items()}
        scaler_state = {k: v.clone() for k, v in self.scaler.tensors().items()} if self.scaler else {}
        return model_state, optim_state, scaler_state

    def _restore(self, snapshot):
        model_state, optim_state, scaler_state = snapshot
        with torch.no_grad():
            for key, value in (self.scaler.tensors().items() if self.scaler else ()):
                value.copy_(scaler_state[key])
            for key, value in self.model.state_dict().items():
                value.copy_(model_state[key])
            for param, state in self.optimizer.state.items():
                for key, value in state.items():
                    if torch.is_tensor(value):
                        # A buffer created by the warm-up did not exist before: zero momentum is
                        # the same as none for SGD (its first step sets the buffer to the grad).
                        value.copy_(optim_state.get(id(param), {}).get(key, torch.zeros_like(value)))

    def _record(self, images, labels):
        static_images = torch.empty_like(images, memory_format=self.memory_format).copy_(images)
        static_labels = labels.clone()
        snapshot = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                self.optimizer.zero_grad(set_to_none=True)
                self.forward_backward(static_images, static_labels)
        torch.cuda.current_stream().wait_stream(side)
        # Gradients must not exist when recording starts: backward then writes fresh ones (in the
        # graph's own memory) on every replay instead of adding to old ones.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss, static_correct = self.forward_backward(static_images, static_labels)
        self._restore(snapshot)
        return graph, static_images, static_labels, static_loss, static_correct

    def __call__(self, images, labels):
        if len(images) not in self.graphs:
            self.graphs[len(images)] = self._record(images, labels)
        graph, static_images, static_labels, loss, correct = self.graphs[len(images)]
        static_images.copy_(images)
        static_labels.copy_(labels)
        graph.replay()
        return loss, correct
