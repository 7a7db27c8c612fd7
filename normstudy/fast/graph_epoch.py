"""A whole training epoch replayed as a few CUDA graphs, each of many steps.

At small batches a step is a few hundred tiny kernels; replaying one recorded step per batch
(:class:`~normstudy.fast.steps.CudaGraphStep`) still leaves a dozen launches and the Python of
the loop (slicing, normalizing, copying the batch, the schedule, the running sums) around every
replay, which at batch 2 cost about as much as the step itself. Here everything a step does on the
device is recorded, ``chunk`` steps per graph:

- the batch is gathered from the epoch's shuffled, augmented uint8 images (one copy per epoch into
  a fixed buffer) at a position kept in a device counter, then normalized;
- the learning rate of each step is read from a device table of the whole schedule, indexed by a
  device step counter, into the tensors the optimizer reads;
- forward, loss, backward and the optimizer step (the :class:`~normstudy.fast.steps.EagerStep`
  body, so its mixed precision and loss scaling come along);
- the running loss and correct counts, and the first non-finite loss, accumulate on the device.

An epoch is then ``steps // chunk`` replays of the chunk graph, then single-step replays for the
rest and for the smaller last batch: no host synchronization until the epoch's figures are read.
The steps, their order, their data and their learning rates are exactly those of the plain loop
(off CUDA the same steps run unrecorded, which is how the tests compare the two).
"""
import torch

from .. import data as data_lib
from ..divergence import NonFiniteLossError
from ..runtime import DEVICE_LOCK
from . import steps as steps_lib


def chunk_for(batch_size, *, images_per_chunk=8192, most=64):
    """Steps per recorded graph: enough to amortize the replay at small batches, few at large
    ones (where a step is long anyway and each extra recorded step costs capture time)."""
    return max(1, min(most, images_per_chunk // batch_size))


class GraphEpoch:
    """Trains ``model`` one epoch at a time on ``loader``'s epochs (a training
    :class:`~normstudy.data.DeviceLoader` on a CUDA device), stepping ``scheduler`` (a
    :class:`~normstudy.fast.optimizers.LambdaSchedule`) as the plain loop would."""

    def __init__(self, model, optimizer, criterion, scheduler, loader, *, amp_dtype, channels_last,
                 total_steps, chunk=None, warmup_steps=3, scaler=None, graphs=True):
        self.model, self.optimizer, self.scheduler, self.loader = model, optimizer, scheduler, loader
        # graphs=False: the same steps, launched one by one (the eager reference path on a GPU)
        self.recorded = graphs and loader.device.type == "cuda"
        self.body = steps_lib.EagerStep(model, optimizer, criterion, amp_dtype=amp_dtype, channels_last=channels_last,
                                        scaler=scaler)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.batch_size = loader.batch_size
        self.chunk = chunk or chunk_for(self.batch_size)
        self.warmup_steps = warmup_steps
        device = loader.device
        n = len(loader.images)
        self.images = loader.images.clone()  # real images and labels: warm-up steps train on them
        self.labels = loader.labels.clone()
        self.position = torch.zeros((), dtype=torch.long, device=device)  # first image of the next batch
        self.step_index = torch.zeros((), dtype=torch.long, device=device)  # global step, for the lr table
        self.batch_index = torch.zeros((), dtype=torch.long, device=device)  # batch within the epoch
        # One figure per run: a scalar, or for a stack of K runs (labels (N, K)) a vector of K.
        shape = tuple(loader.labels.shape[1:])
        self.loss_sum = torch.zeros(shape, device=device)
        self.correct = torch.zeros(shape, dtype=torch.long, device=device)
        self.first_bad = torch.full(shape, -1, dtype=torch.long, device=device)
        self.lr_table = self._lr_table(total_steps, device)
        self.full_batches, self.last_batch = divmod(n, self.batch_size)
        self.graphs = {}  # (steps, batch size) -> CUDA graph

    def _lr_table(self, total_steps, device):
        # lr of every group at every step (one more: the schedule's value after the last step).
        factors = [self.scheduler.factor(step) for step in range(total_steps + 1)]
        return torch.tensor([[base * f for f in factors] for base in self.scheduler.base_lrs],
                            dtype=self.optimizer.param_groups[0]["lr"].dtype, device=device)

    def _one_step(self, batch_size):
        offsets = torch.arange(batch_size, device=self.position.device)
        index = self.position + offsets
        images = data_lib.normalize(self.images.index_select(0, index), mean=self.loader.mean, std=self.loader.std)
        labels = self.labels.index_select(0, index)
        for row, group in enumerate(self.optimizer.param_groups):
            group["lr"].copy_(self.lr_table[row].index_select(0, self.step_index).squeeze(0))
        self.optimizer.zero_grad(set_to_none=True)
        loss, correct = self.body.forward_backward(images.contiguous(memory_format=self.memory_format), labels)
        bad = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad.copy_(torch.where(bad, self.batch_index, self.first_bad))
        self.loss_sum.add_(loss.float() * batch_size)
        self.correct.add_(correct)
        self.position.add_(batch_size)
        self.step_index.add_(1)
        self.batch_index.add_(1)

    def _state(self):
        tensors = [*self.model.state_dict().values(), self.position, self.step_index, self.batch_index,
                   self.loss_sum, self.correct, self.first_bad]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        tensors += [group["lr"] for group in self.optimizer.param_groups]
        if self.body.scaler is not None:  # fp16: the loss scale and its growth count move with each step
            tensors += [self.body.scaler.factor, self.body.scaler.growth_tracker, self.body.scaler.found_inf]
        return tensors

    def _warm_up(self, batch_size):
        """The steps that load and pick the kernels before recording (they must not be recorded;
        :meth:`_record` restores what they change). Each starts at the epoch's first image: three
        consecutive batches of 512 would read past an epoch of 1,024 images (``--smoke``), an
        index out of bounds that a GPU reports as a device-side assert, fatal to the process."""
        for _ in range(self.warmup_steps):
            self.position.zero_()
            self._one_step(batch_size)

    def _record(self, steps, batch_size):
        """Record ``steps`` consecutive steps of ``batch_size``; every tensor the warm-up changed
        is restored, so recording leaves no trace in the training."""
        saved = [t.detach().clone() for t in self._state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._warm_up(batch_size)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for tensor, value in zip(self._state(), saved):
                tensor.copy_(value)
        # Gradients must not exist when recording starts: backward then writes fresh ones (in the
        # graph's own memory) on every replay instead of adding to old ones.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # Its own capture stream, and errors only for this thread's work: several runs may record
        # at once in threads of one process (the study's concurrent runs).
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
            for _ in range(steps):
                self._one_step(batch_size)
        with torch.no_grad():
            for tensor, value in zip(self._state(), saved):
                tensor.copy_(value)
        return graph

    def _shapes(self):
        """The (steps, batch size) graphs one epoch replays, and how often each."""
        chunks, single = divmod(self.full_batches, self.chunk)
        return [((self.chunk, self.batch_size), chunks), ((1, self.batch_size), single),
                ((1, self.last_batch), 1 if self.last_batch else 0)]

    def record(self):
        """Record the graphs an epoch needs, if not yet done; call it outside
        :meth:`runtime.RecordingLock.work` (it takes the lock alone)."""
        if not self.recorded:
            return
        missing = [key for key, count in self._shapes() if count and key not in self.graphs]
        if not missing:
            return
        with DEVICE_LOCK.recording():  # once for all: each time the lock is held alone, every run pauses
            for key in missing:
                self.graphs[key] = self._record(*key)

    def _replay(self, key):
        if not self.recorded:  # nothing to record: run the same steps directly (CPU, tests)
            for _ in range(key[0]):
                self._one_step(key[1])
            return
        if key not in self.graphs:  # a caller that did not record first, in a single-run process
            self.graphs[key] = self._record(*key)
        self.graphs[key].replay()

    def train_epoch(self, epoch=None):
        """One epoch (``epoch``, its number, is for the eager epoch's face: ``fit.EagerEpoch``);
        returns ``(mean loss, accuracy in %)`` as the plain loop does, or raises
        :class:`~normstudy.divergence.NonFiniteLossError` naming the first bad batch. For a stack of runs:
        ``(losses, accuracies, first bad batches)``, lists of one entry per run (-1: none bad)."""
        self.model.train()
        images, labels = self.loader.epoch_tensors()
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.step_index.fill_(self.scheduler.last_epoch)
        for tensor in (self.position, self.batch_index, self.loss_sum, self.correct):
            tensor.zero_()
        self.first_bad.fill_(-1)
        # Between replays, another run's set-up that waits goes first (runtime.RecordingLock),
        # once this run's replays so far are done on its stream.
        finish = torch.cuda.current_stream().synchronize if self.recorded else None
        for key, count in self._shapes():
            for _ in range(count):
                self._replay(key)
                if finish is not None:
                    DEVICE_LOCK.let_waiting_go(finish=finish)
        steps = self.full_batches + bool(self.last_batch)
        self.scheduler.last_epoch += steps
        self.scheduler._apply()  # the lr tensors now hold the next step's rate, as after the plain loop
        seen = len(self.images)
        if self.first_bad.dim():  # a stack: every run's figures, and its first bad batch (-1: none)
            return ([loss / seen for loss in self.loss_sum.tolist()],
                    [100.0 * correct / seen for correct in self.correct.tolist()], self.first_bad.tolist())
        if self.first_bad.item() >= 0:
            raise NonFiniteLossError(self.first_bad.item())
        return self.loss_sum.item() / seen, 100.0 * self.correct.item() / seen
