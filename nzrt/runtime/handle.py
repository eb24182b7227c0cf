"""``Managed``, the handle ``nzrt.managed`` returns: the session that orchestrates entry and exit.

Entry and exit are transactions: on any exception during entry (Ctrl-C included) the model is put
back as it was; exit restores every weight bit for bit. The handle only orders the steps and
answers the public questions (``report()``, ``save()``, the training methods); the parts do the
work, each with its own state: ``Entry`` takes the weights (``entry.py``), the ``Decoder``
compresses and decodes (``decoder.py``), ``Units`` wraps the forwards (``units.py``), the
``Planner`` feeds the scheduler (``placement.py``), ``Restore`` gives the weights back
(``restore.py``), ``accounting`` builds the report. What the forwards, autograd and training
share while the block runs is one ``Shared`` (``shared.py``), never this handle.
"""
from __future__ import annotations

import time
import weakref

import torch
from torch import nn

from .. import osmem
from ..budget import parse_budget
from ..kernels import env
from ..memory import MemoryTracker
from ..scheduler import Scheduler
from . import accounting  # by module: a test injects failures into accounting.build_report
from .config import ManagedConfig
from .decoder import Decoder
from .entry import Entry, resolve_device
from .errors import ManagedError
from .fsdp import ShardedWeights, fsdp_modules
from .passes import PassLock
from .placement import Planner, layer_infos
from .restore import Restore
from .shared import Shared
from .training import LRSchedulers, Trainer
from .transaction import deferred_interrupts
from .units import Units

# model -> weakref to its entered handle. Weak both ways: a model kept managed after
# from_pretrained (its forwards refer to the handle, the handle to the model) is freed by the
# garbage collector as a whole once nothing else refers to it.
_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def handle_of(model) -> "Managed | None":
    """The entered ``Managed`` handle of ``model`` (exactly that module), or None."""
    ref = _REGISTRY.get(model)
    run = ref() if ref is not None else None
    return run if run is not None and run.attached else None


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"managed() takes a torch.nn.Module, got {type(model).__name__}")


def _shared_view(name: str, doc: str) -> property:
    """A read-only view of the block's shared state (``Shared``) on the handle."""
    return property(lambda self: getattr(self.shared, name), doc=doc)


class Managed:
    """The handle ``nzrt.managed`` returns; a context manager (``attach``/``detach`` by hand work too).
    ``config``: what ``managed()`` was given (``ManagedConfig``)."""

    params = _shared_view("params", "committed (managed) Params, in commit order")
    tensors = _shared_view("tensors", "key -> scheduler.TensorSlot")
    scheduler = _shared_view("scheduler", "the scheduler (None outside an entered block)")
    tracker = _shared_view("tracker", "the memory tracker of the block")
    trainer = _shared_view("trainer", "per-parameter optimizers (optimizer=...), else None")
    lock = _shared_view("lock", "the pass lock: one forward at a time")
    fused_stats = _shared_view("fused_stats", "what the fused passes did (policies.Fused)")
    fused_pass = _shared_view("fused_pass", "inside a fused pass now")
    blocked_stats = _shared_view("blocked_stats", "calls of heads kept in row chunks, by path")
    weights_compressed_bytes = _shared_view("weights_compressed_bytes", "the managed weights' compressed bytes")

    def __init__(self, model: nn.Module, config: ManagedConfig | None = None):
        check_model(model)
        self.model = model
        self.config = config if config is not None else ManagedConfig()
        self.attached = False
        self._lock = PassLock()  # one for the handle's life: a thread may hold it across entries
        self._finalizer = None
        self._final_report = None
        self._reset()

    def _reset(self) -> None:
        """Fresh parts for an entry (the previous block's are dropped)."""
        config = self.config
        self.device = torch.device("cpu")
        self.shared = Shared(self.device, Decoder(self.device, config.backend, config.mantissa_bits),
                             fused=config.fused, lock=self._lock)
        self.restore = Restore()
        self._units = Units()
        self.budget = None
        self.fixed_bytes = 0
        self.entry_seconds = 0.0
        self.layers: dict = {}
        self.warnings: list = []
        self.kept_mapped: list = []   # lookup-only embeddings left dense in their file map
        self.weights_dense_bytes = 0

    # -- what the config says ---------------------------------------------------------------
    @property
    def policy(self):
        return self.config.policy

    @property
    def fused(self):
        return self.config.fused

    @property
    def mantissa_bits(self):
        return self.config.mantissa_bits

    @property
    def units(self) -> dict:
        """unit -> tuple of tensor keys (the scheduler's units)."""
        return self._units.units

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> "Managed":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- attach -----------------------------------------------------------------------------
    def attach(self) -> "Managed":
        """Compress and take over the model. On any exception (KeyboardInterrupt included) the
        model is put back exactly as it was before the exception propagates."""
        if self.attached:
            raise ManagedError("this managed() handle is already entered")
        for m in self.model.modules():
            if handle_of(m) is not None:
                raise ManagedError("this model (or a module inside it) is already under nzrt.managed(); "
                                   "leave the first `with` block before entering another")
        for m in list(_REGISTRY.keys()):
            if handle_of(m) is not None and any(sub is self.model for sub in m.modules()):
                raise ManagedError("a module containing this model is already under nzrt.managed()")
        t0 = time.perf_counter()
        self._reset()
        self._final_report = None
        try:
            _REGISTRY[self.model] = weakref.ref(self)
            self.attached = True
            self._attach()
        except BaseException as e:
            try:
                self._detach(report=False)
            except ManagedError as r:  # the rollback itself could not restore everything
                raise r from e
            except BaseException:  # an interrupt held back during the rollback: the first one wins
                pass
            raise
        self.entry_seconds = time.perf_counter() - t0
        if self.fused is not None and self.device.type != "cpu":
            self.warnings.append(f"policy {self.fused.name}: fused generation runs on the CPU only for now; "
                                 f"on {self.device.type} every pass takes the base policy's decode-then-matmul path")
        return self

    def _attach(self) -> None:
        config = self.config
        self.device = dev = resolve_device(self.model, config.device)
        fused = config.fused
        decoder = Decoder(dev, config.backend, config.mantissa_bits, fused.widths if fused is not None else None)
        shared = self.shared = Shared(dev, decoder, fused=fused, lock=self._lock, owner=self)
        shared.tracker = MemoryTracker(dev)
        entry = Entry(self.model, config, shared, self.restore, self.warnings)
        self.kept_mapped = entry.kept_mapped
        modules = fsdp_modules(self.model)
        if modules:  # FSDP2: each rank's local shards compressed, gathered compressed (fsdp.py)
            shared.sharded = ShardedWeights(self.model, decoder, config.min_numel, self.warnings)
            shared.sharded.take(modules)
        found = entry.take_weights()
        units = self._units.build(self.model, shared.params)
        self.fixed_bytes = accounting.fixed_bytes(self.model, [mp.param for mp in shared.params], dev)
        self.budget = parse_budget(config.budget, lambda: shared.tracker.free_bytes())
        self.layers = layer_infos(units, shared.tensors)
        planner = Planner(config.policy, self.layers, self.budget, self.fixed_bytes, dev, units,
                                    shared, self.warnings)
        initial = planner.initial()
        entry.verify_given()
        entry.warm_codec(found, decode=True)  # the decoders' code pages go back at the end of entry (settle)
        threads = env.get("NZRT_DECODE_THREADS")  # numba threads of the CPU decode worker
        shared.scheduler = Scheduler(units, shared.tensors, dev, planner=planner.replan, place=planner.place,
                                     decoder=decoder, prefetch=config.prefetch,
                                     decode_threads=int(threads) if threads else None)
        planner.place(initial)
        shared.scheduler.plan = initial
        stop_worker = shared.scheduler.worker_stopper()
        if stop_worker is not None:  # collected without detach (from_pretrained): stop the thread
            self._finalizer = weakref.finalize(self, stop_worker)
        self._units.install_forwards(self.model, shared)
        if config.training is not None:
            shared.trainer = Trainer(shared, self.model, config.training, config.min_numel)
            shared.trainer.attach()
        self.weights_dense_bytes = sum(s.dense_bytes for s in shared.tensors.values())
        shared.weights_compressed_bytes = sum(s.ct.nbytes for s in shared.tensors.values())
        entry.finish()
        osmem.settle()  # the compressor's temporaries and LLVM's idle code go back to the OS
        shared.tracker.sample()

    # -- detach -----------------------------------------------------------------------------
    def detach(self) -> None:
        """Restore the model exactly: parameters bit for bit on their devices, forwards unwrapped.
        Ctrl-C during the restore is held back until it is complete. If a parameter cannot be
        restored (its decode keeps failing), it stays managed -- still readable, exact -- and
        ``ManagedError`` says so; calling ``detach()`` again retries."""
        if not self.attached:
            return
        self._detach(report=True)

    def _detach(self, report: bool) -> None:
        shared = self.shared
        with deferred_interrupts():
            errors: list = []
            if shared.trainer is not None:
                shared.trainer.detach()
            if shared.scheduler is not None:
                try:
                    shared.scheduler.shutdown()
                except BaseException as e:  # pragma: no cover
                    errors.append(e)
            self._units.remove_forwards()
            shared.decoder.forget_fused()
            if shared.sharded is not None:
                try:
                    shared.sharded.restore()
                except BaseException as e:
                    errors.append(e)
            failed = self.restore.restore_params(shared.params, shared.tensors, shared.decoder,
                                                 self.config.backend, errors)
            if not failed:
                self.restore.undo_moves()
            if report and shared.tracker is not None:
                try:
                    shared.tracker.sample()
                    self._final_report = self._build_report({})
                except BaseException as e:  # the report is a view; the restore matters more
                    self._final_report = None
                    errors.append(e)
                    self.warnings.append(f"the report could not be built: {e!r}")
            if failed:
                shared.params[:] = failed
                raise ManagedError(
                    f"nzrt: {len(failed)} parameter(s) could not be restored (e.g. {failed[0].names[0]!r}: "
                    f"{errors[-1]!r}); they stay compressed and readable. Call detach() again to retry"
                ) from errors[-1]
            try:
                if shared.tracker is not None:
                    shared.tracker.close()
            except Exception:  # pragma: no cover
                pass
            _REGISTRY.pop(self.model, None)
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            self.attached = False
            self.params_restored = len(shared.params)
            shared.params.clear()
            shared.tensors = {}
            self.restore.close()
            if shared.scheduler is not None:
                shared.scheduler.tensors = {}
            osmem.trim()  # what was freed goes back to the operating system
        # everything is restored; an interrupt that came while restoring is raised now
        interrupt = next((e for e in errors if not isinstance(e, Exception)), None)
        if interrupt is not None:
            raise interrupt

    # -- training (optimizer=...; nzrt.runtime.training) -----------------------------------------
    def _trainer(self) -> Trainer:
        if self.shared.trainer is None or not self.attached:
            raise ManagedError("this needs an entered nzrt.managed(model, optimizer=...) block")
        return self.shared.trainer

    @property
    def optimizers(self) -> dict:
        """{parameter name: its torch.optim.Optimizer} (one per trainable parameter)."""
        return self._trainer().optimizers

    def step(self) -> None:
        """Apply every parameter's optimizer to its stored gradient, one weight at a time
        (``OptimizerConfig(in_backward=False)``; with the step in the backward there is nothing left)."""
        self._trainer().step_all()

    def zero_grad(self) -> None:
        self._trainer().zero_grad()

    def lr_scheduler(self, factory) -> "LRSchedulers":
        """One learning-rate scheduler per optimizer, ``factory(optimizer)`` each (e.g.
        ``lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup)``); step them all with the
        returned object's ``step()``. Kept in ``state_dict()``."""
        return self._trainer().lr_scheduler(factory)

    def state_dict(self) -> dict:
        """Optimizer (and LR scheduler) states for resuming; compressed states stay compressed.
        The weights are written by ``save(path)``. Under FSDP2: the weights and the states of
        this rank's shards as DTensors, for ``torch.distributed.checkpoint`` (``fsdp_save``)."""
        if self.attached and self.shared.sharded is not None:
            from .fsdp_save import sharded_state_dict
            return sharded_state_dict(self)
        return self._trainer().state_dict()

    def load_state_dict(self, sd: dict) -> None:
        if self.attached and self.shared.sharded is not None:
            from .fsdp_save import load_sharded_state_dict
            return load_sharded_state_dict(self, sd)
        self._trainer().load_state_dict(sd)

    def save(self, path, tokenizer=None) -> None:
        """Write the model's current weights as a ``.nzrt`` straight from their compressed copies
        (small parameters and buffers are stored dense, as they are). ``tokenizer``: stored too,
        for ``nzrt generate FILE``."""
        if self.attached and self.shared.sharded is not None:  # every rank calls it; rank 0 writes
            from .fsdp_save import save_sharded
            with self.lock:
                save_sharded(self, path, tokenizer)
            return
        from .saving import save_run
        with self.lock:
            save_run(self, path, tokenizer)

    # -- report -----------------------------------------------------------------------------
    def held_bytes(self) -> dict:
        return accounting.held_bytes(self.shared, self.model, self.restore.spill.nbytes(), self.attached)

    def report(self):
        if not self.attached:
            if self._final_report is None:
                raise ManagedError("report() needs a managed() block that has been entered")
            return self._final_report
        self.shared.tracker.sample()
        return self._build_report(self.held_bytes())

    def _build_report(self, held: dict):
        return accounting.build_report(
            self.shared, held, policy=self.policy, layers=self.layers, budget=self.budget,
            fixed_bytes=self.fixed_bytes, mantissa_bits=self.mantissa_bits, entry_seconds=self.entry_seconds,
            warnings=self.warnings, weights_dense_bytes=self.weights_dense_bytes)
