"""Pure training and evaluation steps built with ``torch.func``.

``make_train_step`` returns ``train_step(state, batch) -> (state, metrics)``.
The step is pure: its result depends only on its arguments, and it does not
change them (unless ``donate=True``). Where torch forces hidden state, the step
scopes it: torch's global generator (dropout) is seeded from
``fold_in(state.key, state.step)`` inside a fork that is restored afterwards,
and BatchNorm's running statistics update clones that come back as the new
state's buffers. With ``sync_batchnorm=True`` and several ranks, BatchNorm's
batch statistics are those of all ranks together (see :mod:`fnlight.train.syncbn`).

Gradients come from ``torch.func.grad_and_value`` under ``compile=True`` or another
``torch.func`` transform; the eager step otherwise takes them with ``torch.autograd.grad``,
as a plain PyTorch loop does, which is faster (see ``TrainStep._eager_grads``).

Example:
    >>> import torch, fnlight, fnlight.optim as fo
    >>> model = torch.nn.Linear(4, 2)
    >>> def loss_fn(model_fn, batch, key):
    ...     x, y = batch
    ...     return torch.nn.functional.cross_entropy(model_fn(x), y)
    >>> step = fnlight.make_train_step(model, loss_fn, fo.adam(1e-3))
    >>> state = fnlight.TrainState.create(model, fo.adam(1e-3))
    >>> state, metrics = step(state, (torch.randn(8, 4), torch.randint(0, 2, (8,))))
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch.func import functional_call, grad_and_value

from .. import distributed
from .. import random as fr
from ..optim import GradientTransformation, clip_by_global_norm
from ..optim import sharded as optim_sharded
from ..optim import step as optim_step
from ..tree import batch_size, tree_leaves, tree_map
from . import checks
from ._compile import (
    DynamoWatch,
    GraphBreakError,
    GraphBreakWarning,
    exc_locations,
    graph_break_message,
    own_code,
    quiet_foreach_norm,
)
from .state import Tensors, TrainState
from .syncbn import convert_sync_batchnorm, has_batchnorm

Metrics = dict[str, torch.Tensor]
LossFn = Callable[[Callable[..., Any], Any, torch.Tensor], Any]
Precision = Literal["32", "bf16-mixed"]


class TorchFuncTrapError(RuntimeError):
    """A known ``torch.func`` limitation was hit; the message says what to do instead."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradients were NaN or infinite."""


_TRAPS = (
    (("running_mean", "were not batched"),
     "BatchNorm cannot update its running statistics under torch.func.vmap. Use "
     "nn.BatchNorm(track_running_stats=False), GroupNorm/LayerNorm, or "
     "torch.func.replace_all_batch_norm_modules_(model) if you do not need eval-mode statistics."),
    (("setup_context",),
     "torch.utils.checkpoint (activation checkpointing) does not work under torch.func.grad, which fnlight's "
     "step uses with compile=True or inside another torch.func transform. Checkpoint in the eager step "
     "(compile=False) instead, or, to save memory, split the batch with make_train_step(..., accumulate=k)."),
    (("saved tensor hooks",),
     "activation checkpointing (torch.utils.checkpoint) and other saved-tensor hooks do not work under "
     "torch.func.grad, which fnlight's step uses with compile=True or inside another torch.func transform. "
     "Checkpoint in the eager step (compile=False) instead, or, to save memory, split the batch with "
     "make_train_step(..., accumulate=k)."),
)


@contextlib.contextmanager
def _explain_traps() -> Iterator[None]:
    hooks_enabled = torch._C._autograd._saved_tensors_hooks_is_enabled()
    try:
        yield
    except BaseException as e:
        if hooks_enabled and not torch._C._autograd._saved_tensors_hooks_is_enabled():
            # When Dynamo's trace of grad_and_value fails, torch (2.13) leaves grad_and_value's
            # disable_saved_tensors_hooks in force, and every later torch.utils.checkpoint in the
            # process fails: undo it.
            torch._C._autograd._saved_tensors_hooks_enable()
        if not isinstance(e, RuntimeError | ValueError):
            raise
        text = str(e)
        for needles, advice in _TRAPS:
            if all(n in text for n in needles):
                raise TorchFuncTrapError(f"{advice}\n(torch said: {text.splitlines()[0]})") from e
        raise


def _check_model(model: torch.nn.Module) -> None:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
        raise TypeError(
            f"make_*_step got a {type(model).__name__}-wrapped module, whose hooks torch.func cannot see. "
            "Pass the plain module (ddp.module): fnlight averages gradients across ranks itself, in one "
            "flat all-reduce inside the step."
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")


def _set_mode(model: torch.nn.Module, training: bool) -> None:
    if model.training != training:
        model.train(training)


def stateless_template(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules whose parameters and buffers are on the meta device (no storage).

    A step runs its module through ``functional_call``, which supplies every parameter and buffer
    from the state, so the module's own tensors are never read. The steps keep this copy instead of
    ``model``, so they hold no weights of their own: once the caller lets go of ``model``, the
    state's tensors are the only copy (as in a plain PyTorch loop, where the module's are). Tied
    tensors stay tied (one meta tensor), ``requires_grad`` is kept, other attributes are deep-copied.
    A module whose tensors are all on the meta device already is returned itself, and so is one
    that ``copy.deepcopy`` cannot copy (the step then keeps that module, weights included).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> template = stateless_template(model)
        >>> template.weight.device.type, template.weight.requires_grad, model.weight.device.type
        ('meta', True, 'cpu')
    """
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.is_meta for t in tensors):
        return model
    try:
        # (the memo maps each tensor to its meta twin; tied tensors share one id, so one twin)
        memo: dict[int, Any] = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                                for p in model.parameters()}
        memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
        return copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 - a module deepcopy cannot copy (a lock, an open file...) is kept as it is
        return model


def _template(model: torch.nn.Module, fn: Callable[..., Any]) -> torch.nn.Module:
    """What a step keeps of ``model``: its :func:`stateless_template`, or ``model`` itself when the loss or
    metrics function ``fn`` runs that very instance (``fn.runs_module is model``: fnlight.lightning's
    functions redirect the instance's ``forward`` to its ``training_step``)."""
    return model if getattr(fn, "runs_module", None) is model else stateless_template(model)


class _Functional:
    """``functional_call(module, (params, buffers), args, kwargs)``, with the module's tied
    parameters and buffers resolved once instead of on every call.

    ``functional_call``'s default ``tie_weights=True`` walks every submodule on every call to
    find tensors registered under several names (~20 us a call for a 3-layer MLP). A state
    holds each tied tensor once, under its first name; here the other names are given the
    same value explicitly, which is what ``tie_weights=True`` does, so ``tie_weights=False``
    computes the same. The ties are read once, when the step is made.

    The module is a :func:`stateless_template`: every tensor must come from the state
    (:meth:`check` says which ones a state lacks).
    """

    def __init__(self, module: torch.nn.Module):
        first: dict[int, str] = {}
        self.module, self.aliases = module, {}
        for name, t in (*module.named_parameters(remove_duplicate=False),
                        *module.named_buffers(remove_duplicate=False)):
            if id(t) in first:
                self.aliases[name] = first[id(t)]
            else:
                first[id(t)] = name
        self.names = frozenset(first.values())

    def check(self, state: TrainState) -> None:
        """A KeyError naming the module's tensors that ``state`` lacks (the module has none of its own)."""
        missing = self.names.difference(state.params, state.buffers)
        if missing:
            raise KeyError(
                f"the state has no value for the module's {sorted(missing)}: make it with "
                "TrainState.create(model, ...) from the module the step was made with (the step keeps the "
                "module without its tensors, so every parameter and buffer comes from the state)")

    def __call__(self, params: Tensors, buffers: Tensors, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        values: tuple[Tensors, ...] = (params, buffers)
        if self.aliases:
            merged = {**params, **buffers}
            values += ({alias: merged[name] for alias, name in self.aliases.items() if name in merged},)
        return functional_call(self.module, values, args, kwargs, tie_weights=False)


def _generators(device: torch.device) -> list[torch.Generator]:
    gens = [torch.default_generator]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gens.append(torch.cuda.default_generators[index])
    return gens


@contextlib.contextmanager
def _rng_scope(key: torch.Tensor, device: torch.device) -> Iterator[None]:
    """Seed torch's default generators (the CPU's, and the device's: what dropout
    draws from) from ``key``, and restore their states afterwards, so the global
    streams are untouched.

    Saving and restoring just these generators costs microseconds; torch.random.fork_rng
    plus torch.manual_seed also seed every other backend and cost ~0.2-0.4 ms a step.
    """
    gens = _generators(device)
    saved = [g.get_state() for g in gens]
    seed = int(key.cpu()) & ((1 << 64) - 1)
    for g in gens:
        g.manual_seed(seed)
    try:
        yield
    finally:
        for g, st in zip(gens, saved, strict=True):
            g.set_state(st)


def _step_key(state: TrainState) -> torch.Tensor:
    """``fold_in(state.key, state.step)``: with an int step (no tensor ops) when on the CPU."""
    step = int(state.step) if state.step.device.type == "cpu" else state.step
    return fr.fold_in(state.key, step)


def _finite(loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """The step's one non-finite check: a bool tensor, true when the loss and every gradient are finite.

    Eager, the AMP helper checks all gradients in one foreach pass per device and dtype (and scales
    them by 1: unchanged); in a compiled graph inductor fuses the per-tensor checks instead.
    """
    if torch.compiler.is_compiling():
        return torch.stack([torch.isfinite(loss), *(torch.isfinite(g).all() for g in grads)]).all()
    found = torch.zeros((), device=loss.device)
    for group in _by_device_dtype(grads).values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones((), device=group[0].device))
    return torch.isfinite(loss) & (found == 0)


def _by_device_dtype(tensors: list[torch.Tensor]) -> dict[tuple[Any, Any], list[torch.Tensor]]:
    out: dict[tuple[Any, Any], list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out


def _nonfinite(loss: torch.Tensor, state: TrainState) -> NonFiniteError:
    what = "loss" if not torch.isfinite(loss) else "gradients"
    return NonFiniteError(f"non-finite {what} at step {int(state.step)} (loss={float(loss)}). Use "
                          "on_nonfinite='skip' to skip such steps, or lower the learning rate / clip the gradients.")


def split_loss(out: Any) -> tuple[torch.Tensor, Metrics]:
    """What ``loss_fn`` returned, as ``(scalar loss, metrics)``: a loss, or ``(loss, metrics_dict)``;
    anything else (a model's output, a non-scalar) is a TypeError saying what to return.

    Example:
        >>> split_loss((torch.tensor([2.0]), {"acc": 0.5}))
        (tensor(2.), {'acc': 0.5})
    """
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        loss, metrics = out
    else:
        loss, metrics = out, {}
    if not isinstance(loss, torch.Tensor) and (getattr(loss, "loss", None) is not None
                                               or isinstance(loss, Mapping) and "loss" in loss):
        raise TypeError(
            f"loss_fn returned a {type(loss).__name__} (a model's output, such as a Hugging Face ModelOutput), not "
            "a loss tensor: return its .loss, e.g. `return model_fn(**batch).loss` (or "
            "`out = model_fn(**batch); return out.loss, {'ppl': out.loss.exp()}` with metrics)")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn must return a scalar loss tensor or (loss, metrics_dict), got {got}")
    return loss.reshape(()), dict(metrics)


def _compile_options(compile: bool | Mapping[str, Any], device_type: str) -> dict[str, Any]:
    """``torch.compile`` options for ``make_train_step(compile=...)``: a dict is passed on, over these defaults:

    - ``dynamic=False``: a new batch shape (an epoch's smaller last batch) compiles a graph of
      its own, as in JAX. Dynamo's automatic dynamic shapes would instead retrace with a
      symbolic batch size, and dropout under ``torch.func.grad`` fails on symbolic sizes.
    - on the CPU with ``compile=True``, inductor's C++ wrapper (``cpp_wrapper``), which calls the
      graph's kernels from C++ instead of generated Python: ~10% more steps/s for a small MLP
      (benchmarks/step_throughput.py), at the same compile time.
    """
    if isinstance(compile, Mapping):
        return {"dynamic": False, **compile}
    return {"dynamic": False, **({"options": {"cpp_wrapper": True}} if device_type == "cpu" else {})}


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of a step's ``precision`` on ``device`` (none for ``"32"``).

    Example:
        >>> with autocast("bf16-mixed", torch.device("cpu")):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Fns(NamedTuple):
    """A step's functions for one device type (compiled with ``compile=...``)."""

    gradients: Callable[..., Any]  # phase 1, one micro-batch: (params, buffers, batch, key, device) -> grads, aux
    update: Callable[..., Any]  # phase 2: (grads, opt_state, params) -> (params, opt_state)
    whole: Callable[..., Any] | None  # both phases in one compiled graph, with the finite flag


@dataclass
class _Cache:
    """What a step builds on its first calls (its only mutable part): the functions per device type,
    and whether its first compiled call was checked for graph breaks."""

    fns: dict[str, _Fns] = dataclasses.field(default_factory=dict)
    checked: bool = False
    fell_back: bool = False  # the first compiled call broke the graph: the step runs eagerly since


@dataclass(frozen=True, eq=False)
class TrainStep:
    """``train_step(state, batch) -> (state, metrics)``; see :func:`make_train_step`.

    A step has two phases: gradients (``_gradients``: micro-batches, ranks) and apply (``_apply``:
    one non-finite check, clipping with :func:`fnlight.optim.clip_by_global_norm`, the optimizer).
    Compiled, with ``accumulate=1`` and ``on_nonfinite="raise"`` on one rank, both run as one graph.
    """

    model: torch.nn.Module
    loss_fn: LossFn
    optimizer: GradientTransformation
    accumulate: int = 1
    clip: float | None = None
    precision: Precision = "32"
    compile: bool | Mapping[str, Any] = False
    donate: bool = False
    on_nonfinite: Literal["raise", "skip"] = "raise"
    sync_batchnorm: bool = False
    shard_optimizer_state: bool = False

    def __post_init__(self) -> None:
        _check_model(self.model)
        # The step keeps the module without its tensors (the state supplies them): it does not keep
        # the user's weights alive, and it never changes the user's module (nor its train/eval mode).
        object.__setattr__(self, "model", _template(self.model, self.loss_fn))
        # functional_call runs this template: a copy with synchronized BatchNorm layers (same
        # parameter and buffer names), or that module itself. torch.nn.SyncBatchNorm layers
        # are always converted: their own forward cannot run under torch.func with several ranks.
        plain = self.sync_batchnorm
        template = convert_sync_batchnorm(self.model, plain=plain) if has_batchnorm(self.model, plain=plain) \
            else self.model
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_call", _Functional(template))
        checks.check_step_options(self.accumulate, self.precision, self.on_nonfinite, self.clip)
        object.__setattr__(self, "_clipper", clip_by_global_norm(self.clip) if self.clip is not None else None)
        object.__setattr__(self, "_cache", _Cache())

    def _fns(self, device: torch.device) -> _Fns:
        fns = self._cache.fns.get(device.type)
        if fns is None:
            fns = self._cache.fns[device.type] = self._build(device.type)
        return fns

    def _build(self, device_type: str) -> _Fns:
        if not self.compile or self._cache.fell_back:
            return _Fns(self._eager_grads, self._update, None)
        # Compile around the torch.func transform, never inside it (as torch's docs require), and
        # each step its own copy of the code (see own_code).
        options = _compile_options(self.compile, device_type)

        def compiled(method: Callable[..., Any]) -> Callable[..., Any]:
            return torch.compile(own_code(method), **options)

        # One graph for both phases: one guard check and no Python in between. The update is
        # computed before the finite flag is read, which on_nonfinite="raise" allows.
        whole = compiled(self._whole) if self.accumulate == 1 and self.on_nonfinite == "raise" else None
        return _Fns(compiled(self._grad_and_value), compiled(self._update), whole)

    def donating(self) -> TrainStep:
        """The same step with ``donate=True`` (what the Trainer drives internally).

        A compiled step is its own donating variant: it returns itself, so that the graph compiled
        for the user's step (cold compiles take seconds to minutes) is the one the Trainer runs,
        instead of compiling a second, in-place graph. (Pass ``donate=True`` with ``compile=True``
        to compile the in-place graph from the start.)

        Example:
            ```python
            fast = make_train_step(model, loss_fn, opt).donating()  # its input state must not be reused
            ```
        """
        if self.donate or self.compile:
            return self
        return dataclasses.replace(self, donate=True)

    # -- the pure parts -----------------------------------------------------
    def _loss(self, params: Tensors, buffers: Tensors, batch: Any, key: torch.Tensor,
              device: torch.device) -> tuple[torch.Tensor, Metrics]:
        def model_fn(*args: Any, **kwargs: Any) -> Any:
            return self._call(params, buffers, args, kwargs)

        with autocast(self.precision, device):
            loss, metrics = split_loss(self.loss_fn(model_fn, batch, key))
        if params and not loss.requires_grad:
            raise ValueError(
                "the loss does not depend on the parameters (it does not require grad), so every gradient would "
                "be zero: compute it from model_fn's outputs. (torch.utils.checkpoint with use_reentrant=True cuts "
                "the graph when its inputs do not require grad: use use_reentrant=False.)")
        return loss.float(), {k: torch.as_tensor(v).detach() for k, v in metrics.items()}

    def _grad_and_value(self, params: Tensors, buffers: Tensors, batch: Any, key: torch.Tensor,
                        device: torch.device) -> tuple[Tensors, tuple[torch.Tensor, Metrics]]:
        return grad_and_value(self._loss, has_aux=True)(params, buffers, batch, key, device)

    def _eager_grads(self, params: Tensors, buffers: Tensors, batch: Any, key: torch.Tensor,
                     device: torch.device) -> tuple[Tensors, tuple[torch.Tensor, Metrics]]:
        """Gradients, loss and metrics for the eager step: with ``torch.autograd.grad``, as a plain
        ``loss.backward()`` loop computes them, when nothing around the step needs ``_grad_and_value``:
        no torch.func transform or compile is active, no input requires grad (so no outer graph to
        connect to) and no inference tensors are involved.

        grad_and_value wraps every tensor and dispatches every op through its own autograd level:
        ~0.5 ms a step for a 784-256-256-10 MLP on a 2-core CPU, a quarter of a plain PyTorch step.
        The two agree to float rounding, bitwise for many models, but not always: grad_and_value
        runs the backward with create_graph=True, which selects other backward formulas for some
        ops (SiLU, GroupNorm, LSTM), and draws dropout masks for non-contiguous inputs differently.
        """
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() \
                or torch.is_inference_mode_enabled() or any(p.is_inference() for p in params.values()) \
                or any(isinstance(t, torch.Tensor) and t.requires_grad
                       for t in tree_leaves((params, buffers, batch, key))):
            return self._grad_and_value(params, buffers, batch, key, device)
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():  # as grad_and_value: gradients even under an outer no_grad
            loss, metrics = self._loss(leaves, buffers, batch, key, device)
            found = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        # Autocast caches its casts of leaves that require grad until the outermost autocast exits:
        # under an autocast of the caller's, every step's new leaves would pile up there.
        torch.clear_autocast_cache()
        # grad_and_value gives zeros for parameters the loss does not use
        grads = {k: torch.zeros_like(params[k]) if g is None else g for k, g in zip(leaves, found, strict=True)}
        return grads, (loss.detach(), metrics)

    def _update(self, grads: Tensors, opt_state: Any, params: Tensors) -> tuple[Tensors, Any]:
        """Phase 2's arithmetic: clip (``clip_by_global_norm``'s), then the optimizer's step."""
        if self._clipper is not None:
            # out of place: autograd may hand the same gradient tensor to several parameters
            grads, _ = self._clipper.update(grads, self._clipper.init(grads))
        return optim_step(self.optimizer, grads, opt_state, params, inplace=self.donate)

    def _whole(self, params: Tensors, buffers: Tensors, opt_state: Any, batch: Any, key: torch.Tensor,
               device: torch.device) -> tuple[Tensors, Any, torch.Tensor, Metrics, torch.Tensor]:
        grads, (loss, metrics) = self._grad_and_value(params, buffers, batch, key, device)
        finite = _finite(loss, list(grads.values()))
        params, opt_state = self._update(grads, opt_state, params)
        return params, opt_state, loss, metrics, finite

    # -- the step -------------------------------------------------------------
    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if not state.params:
            raise ValueError("the state has no trainable parameters, so there is nothing to train (TrainState.create "
                             "keeps parameters with requires_grad=False among the buffers)")
        self._call.check(state)
        _set_mode(self.model, True)
        if self._template is not self.model:
            _set_mode(self._template, True)
        device = state.step.device
        step_key = _step_key(state)
        # BatchNorm updates its statistics in place: it gets copies (small), which become the
        # new buffers; so even a donated state is intact when a non-finite step is skipped.
        buffers = {k: v.clone() for k, v in state.buffers.items()}
        fns = self._fns(device)
        if self._sharding():  # ZeRO-1 (see fnlight.train.zero): reduce-scatter, update a slice, all-gather
            grads, loss, metrics = self._gradients(fns, state.params, buffers, batch, step_key, device)
            return self._apply_sharded(state, buffers, grads, loss, metrics)
        if not self.compile or self._cache.fell_back:
            grads, loss, metrics = self._gradients(fns, state.params, buffers, batch, step_key, device)
            return self._apply(fns, state, buffers, grads, loss, metrics)
        with self._compiling():
            if fns.whole is not None and distributed.world_size() == 1:  # (ranks must all-reduce in between)
                with _rng_scope(step_key, device), _explain_traps():
                    params, opt_state, loss, metrics, finite = fns.whole(
                        state.params, buffers, state.opt_state, batch, step_key, device)
                if not bool(finite):
                    raise _nonfinite(loss, state)
                new = state.replace(params=params, buffers=buffers, opt_state=opt_state, step=state.step + 1)
                return new, {"loss": loss, **metrics}
            grads, loss, metrics = self._gradients(fns, state.params, buffers, batch, step_key, device)
            return self._apply(fns, state, buffers, grads, loss, metrics)

    def _gradients(self, fns: _Fns, params: Tensors, buffers: Tensors, batch: Any, key: torch.Tensor,
                   device: torch.device) -> tuple[Tensors, torch.Tensor, Metrics]:
        """Phase 1: the gradients of the batch (averaged over micro-batches and ranks), loss and metrics."""
        if self.accumulate == 1:
            grads, loss, metrics = self._micro(fns, params, buffers, batch, key, device)
        else:
            grads, loss, metrics = self._accumulated(fns, params, buffers, batch, key, device)
        if distributed.world_size() > 1 and not self._sharding():
            grads = distributed.all_reduce_mean(grads)
        return grads, loss, metrics

    def _sharding(self) -> bool:
        return self.shard_optimizer_state and distributed.world_size() > 1

    def _apply_sharded(self, state: TrainState, buffers: Tensors, grads: Tensors, loss: torch.Tensor,
                       metrics: Metrics) -> tuple[TrainState, Metrics]:
        """Phase 2 with sharded optimizer state: this rank's slice of the mean gradients (one
        reduce-scatter), the same non-finite decision on every rank, the optimizer on this rank's
        pieces (whole-tensor norms all-reduced), the new parameters all-gathered. The update runs
        eagerly (``compile`` compiles the gradients)."""
        from . import zero

        if not zero.is_sharded(state):
            state = zero.shard(state, self.optimizer)
        layout = zero.check_layout(state)
        grads = zero.reduce_scatter_mean(grads, layout)
        finite = distributed.all_true(bool(_finite(loss, list(grads.values()))), state.step.device)
        if not finite:
            return self._skip(state, loss, metrics)
        with optim_sharded(zero.sum_across, layout.piece_map()):
            pieces, inner = self._update(grads, state.opt_state.inner, layout.pieces(state.params))
        params = zero.all_gather_params(pieces, layout)
        return self._finish(state, params, state.opt_state._replace(inner=inner), buffers, loss, metrics)

    def _apply(self, fns: _Fns, state: TrainState, buffers: Tensors, grads: Tensors, loss: torch.Tensor,
               metrics: Metrics) -> tuple[TrainState, Metrics]:
        """Phase 2: the non-finite check (read on the host before anything is updated, so a donated
        state is intact when the step is skipped), then clipping and the optimizer."""
        finite = bool(_finite(loss, list(grads.values())))
        if distributed.world_size() > 1:  # every rank must take the same decision, or the replicas diverge
            finite = distributed.all_true(finite, state.step.device)
        if not finite:
            return self._skip(state, loss, metrics)
        params, opt_state = fns.update(grads, state.opt_state, state.params)
        return self._finish(state, params, opt_state, buffers, loss, metrics)

    def _skip(self, state: TrainState, loss: torch.Tensor, metrics: Metrics) -> tuple[TrainState, Metrics]:
        """A non-finite step: raised, or skipped (the state unchanged but its step)."""
        if self.on_nonfinite == "raise":
            raise _nonfinite(loss, state)
        return state.replace(step=state.step + 1), {"loss": loss, **metrics, "skipped": torch.ones(())}

    def _finish(self, state: TrainState, params: Tensors, opt_state: Any, buffers: Tensors, loss: torch.Tensor,
                metrics: Metrics) -> tuple[TrainState, Metrics]:
        """The new state and the step's metrics, once the update is made."""
        if distributed.world_size() > 1 and buffers:
            # BatchNorm statistics are averaged across ranks (as Flax averages batch_stats), so that
            # every rank holds the same state and a checkpoint does not depend on who wrote it.
            # With sync_batchnorm they are equal already; the mean keeps them so (to rounding) and
            # also covers any other buffer a forward changed.
            floats = {k: v for k, v in buffers.items() if v.is_floating_point()}
            buffers = {**buffers, **distributed.all_reduce_mean(floats)}
        new = state.replace(params=params, buffers=buffers, opt_state=opt_state, step=state.step + 1)
        if self.on_nonfinite == "skip":
            metrics = {**metrics, "skipped": torch.zeros(())}
        return new, {"loss": loss, **metrics}

    @contextlib.contextmanager
    def _compiling(self) -> Iterator[None]:
        """Around a compiled call: the first one is watched for graph breaks (see
        :class:`GraphBreakWarning`); a break under ``fullgraph=True`` becomes a :class:`GraphBreakError`;
        inductor's warning about ``_foreach_norm`` (clipping's) is silenced."""
        fullgraph = isinstance(self.compile, Mapping) and bool(self.compile.get("fullgraph"))
        watch = DynamoWatch() if not self._cache.checked else None
        try:
            with quiet_foreach_norm(), watch or contextlib.nullcontext():
                yield
        except torch._dynamo.exc.Unsupported as e:
            if fullgraph:
                raise GraphBreakError(graph_break_message(
                    [str(e).strip().splitlines()[0]], (watch.locations if watch else []) or exc_locations(e),
                    fullgraph=True)) from e
            raise
        finally:
            self._cache.checked = True
        if watch is not None and watch.reasons:
            # Dynamo gives up the gradient computation at a break inside torch.func.grad and runs it
            # in functorch's eager mode, slower than the eager step: run that from now on.
            self._cache.fell_back = True
            self._cache.fns.clear()
            warnings.warn(GraphBreakWarning(graph_break_message(watch.reasons, watch.locations)),
                          stacklevel=4)

    def _micro(self, fns: _Fns, params: Tensors, buffers: Tensors, batch: Any, key: torch.Tensor,
               device: torch.device) -> tuple[Tensors, torch.Tensor, Metrics]:
        with _rng_scope(key, device), _explain_traps():
            grads, (loss, metrics) = fns.gradients(params, buffers, batch, key, device)
        # The gradient of a parameter used only through a broadcast (``p.sum()``) is an expanded
        # tensor, whose elements share memory: the in-place kernels that follow cannot write it.
        grads = {k: g.contiguous() if g.numel() > 1 and 0 in g.stride() else g for k, g in grads.items()}
        return grads, loss, metrics

    def _accumulated(self, fns: _Fns, params: Tensors, buffers: Tensors, batch: Any, key: torch.Tensor,
                     device: torch.device) -> tuple[Tensors, torch.Tensor, Metrics]:
        """Gradients of k micro-batches, weighted by their sizes: for a mean-reduced
        loss this equals the gradient of the whole batch."""
        n = batch_size(batch)
        if n < self.accumulate:
            raise ValueError(f"accumulate={self.accumulate} needs batches of at least that many samples, got {n}")
        chunks = [tree_map(lambda t, i=i: torch.tensor_split(t, self.accumulate)[i], batch)
                  for i in range(self.accumulate)]
        total: Tensors = {}
        loss = torch.zeros(())
        metrics: Metrics = {}
        for i, chunk in enumerate(chunks):
            w = batch_size(chunk) / n
            g, l_i, m_i = self._micro(fns, params, buffers, chunk, fr.fold_in(key, i), device)
            keys = list(g)
            scaled = torch._foreach_mul([g[k] for k in keys], w)
            if total:
                torch._foreach_add_([total[k] for k in keys], scaled)
            else:
                total = dict(zip(keys, scaled, strict=True))
            loss = loss + l_i * w
            metrics = {k: metrics.get(k, 0) + v * w for k, v in m_i.items()}
        return total, loss, metrics


def make_train_step(model: torch.nn.Module, loss_fn: LossFn, optimizer: GradientTransformation, *,
                    accumulate: int = 1, clip: float | None = None, precision: Precision = "32",
                    compile: bool | Mapping[str, Any] = False, donate: bool = False,
                    on_nonfinite: Literal["raise", "skip"] = "raise", sync_batchnorm: bool = False,
                    ensemble: bool = False, member_batches: bool = False, member_chunk: int | None = None,
                    dp: Any = None, shard_optimizer_state: bool = False) -> Any:
    """Build ``train_step(state, batch) -> (state, metrics)``.

    Args:
        model: the module, used only as a stateless template: the step keeps a copy of its modules
            without their tensors (:func:`stateless_template`; every parameter and buffer comes from
            the state), so it does not keep the module's weights alive (``del model`` after
            ``TrainState.create`` leaves the state's as the only copy), never changes the module (nor
            its train/eval mode), and does not see changes made to the module after the step is made.
        loss_fn: ``loss_fn(model_fn, batch, key)`` returning a scalar loss or
            ``(loss, metrics_dict)``; ``model_fn(*inputs)`` runs the module with
            the state's parameters and buffers; ``key`` is this step's key.
        optimizer: from :mod:`fnlight.optim` (it must be the one the state was created with).
        accumulate: split each batch into this many micro-batches and average
            their gradients (weighted by size): for a mean-reduced loss, equal to
            one step on the whole batch, with less activation memory. (BatchNorm
            sees each micro-batch: its statistics are per micro-batch and its
            running averages are updated k times.)
        clip: clip gradients to this global L2 norm.
        precision: ``"32"`` or ``"bf16-mixed"`` (autocast; parameters stay float32).
        compile: run the gradient and update computations through ``torch.compile``
            (``True``, or a dict of ``torch.compile`` options such as ``{"backend": "aot_eager"}``).
            Shapes are static (``dynamic=False`` unless the dict says otherwise): a batch of
            a new size, such as an epoch's smaller last batch, compiles a graph of its own
            once (up to Dynamo's ``recompile_limit``, 8; beyond it, eager with a warning).
            On the CPU, ``True`` uses inductor's C++ wrapper (``cpp_wrapper``).
            A learning-rate schedule is traced from the step counter, so it does
            not cause recompilation. If the first call does not compile into one graph
            (a graph break), a :class:`GraphBreakWarning` names Dynamo's reason, your line
            and the known fixes, and the step runs eagerly from then on;
            ``{"fullgraph": True}`` makes that a :class:`GraphBreakError`.
        donate: reuse the input state's memory (parameters, optimizer state and
            buffers are updated in place). Faster, but the input state must not be
            used afterwards: like JAX's ``donate_argnums``. Off by default. (The Trainer
            donates the states it makes through :meth:`TrainStep.donating`.)
        on_nonfinite: ``"raise"`` a NonFiniteError naming the step, or ``"skip"``
            the update (only the step counter advances; metrics get ``skipped=1``).
            With ``compile=True`` and ``"raise"``, gradients and update are one graph
            and the check comes after it: a donated state is then already updated
            when the error is raised.
        sync_batchnorm: with more than one rank, BatchNorm layers (``BatchNorm1d/2d/3d``) in
            training mode use the mean and variance of the batch of all ranks together, as
            ``torch.nn.SyncBatchNorm`` (Lightning's ``sync_batchnorm=True``), and update their
            running statistics with them: BatchNorm on 2 ranks with half batches then computes what
            it computes on 1 rank with whole batches. Costs one small all-reduce per layer in the forward and one in the
            backward (each micro-batch with ``accumulate``). Parameter and buffer names do not
            change; with one rank it changes nothing. Works with ``compile=True`` (torch.compile
            traces the all-reduces into the graph). ``torch.nn.SyncBatchNorm`` layers (e.g. from
            ``SyncBatchNorm.convert_sync_batchnorm``) are synchronized this way in any case.
        ensemble: train a stacked state (:func:`fnlight.stack_states`), every member on the same
            batch, in one vectorized step; metrics have shape ``[members]``. ``optimizer`` may then be
            a list with one optimizer per member. See :mod:`fnlight.train.ensemble`.
        member_batches: with ``ensemble``, the batch has a leading member axis: one batch per member.
        member_chunk: with ``ensemble``, vectorize over this many members at a time (default: all):
            the step's working memory (gradients, activations) is then that of ``member_chunk`` members.
        dp: a :class:`fnlight.DPConfig`: DP-SGD (per-sample clipping and Gaussian noise) instead of
            the ordinary gradient (``clip``, ``compile`` and ``sync_batchnorm`` do not apply).
        shard_optimizer_state: ZeRO-1 with more than one rank: each rank keeps the optimizer state of
            a contiguous 1/N slice of the flat parameters; gradients are reduce-scattered, each rank
            updates its slice and the parameters are all-gathered, inside the step. The first step
            shards the ordinary ``TrainState.create`` state (``state.opt_state`` becomes a
            :class:`fnlight.train.zero.ShardedOptState`); :func:`fnlight.train.zero.unshard` gathers it
            back. Equal to the replicated step (see docs/distributed.md for the measured differences);
            not with ``ensemble``/``dp``; with ``compile`` the update runs eagerly; adafactor and
            adaptive_grad_clip refuse (their statistics are over rows of whole tensors). One rank: no effect.

    When ``torch.distributed`` is initialized with more than one rank, the
    gradients are averaged across ranks in one flat buffer before the update.
    The finite check reads the loss on the host once per step.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> def loss_fn(model_fn, batch, key):
        ...     x, y = batch
        ...     return torch.nn.functional.cross_entropy(model_fn(x), y)
        >>> opt = fo.adamw(1e-3)
        >>> step = make_train_step(model, loss_fn, opt, clip=1.0, accumulate=2)
        >>> state = fnlight.TrainState.create(model, opt, seed=0)
        >>> new_state, metrics = step(state, (torch.randn(8, 4), torch.randint(0, 2, (8,))))
        >>> int(new_state.step), int(state.step), sorted(metrics)   # the input state is untouched
        (1, 0, ['loss'])

        Under torchrun, ``make_train_step(model, loss_fn, opt, sync_batchnorm=True)`` syncs BatchNorm statistics.
    """
    for opt in optimizer if ensemble and type(optimizer) in (list, tuple) else (optimizer,):  # (not a NamedTuple)
        checks.check_train_step_args(loss_fn, opt)
    if shard_optimizer_state and (ensemble or dp is not None):
        raise ValueError("shard_optimizer_state=True works with the ordinary step, not with ensemble=True or dp=")
    if ensemble or dp is not None:
        from .ensemble import make_vectorized_train_step
        return make_vectorized_train_step(model, loss_fn, optimizer, accumulate=accumulate, clip=clip,
                                          precision=precision, compile=compile, donate=donate,
                                          on_nonfinite=on_nonfinite, sync_batchnorm=sync_batchnorm,
                                          ensemble=ensemble, member_batches=member_batches,
                                          member_chunk=member_chunk, dp=dp)
    return TrainStep(model, loss_fn, optimizer, accumulate, clip, precision, compile, donate, on_nonfinite,
                     sync_batchnorm, shard_optimizer_state)


@dataclass(frozen=True, eq=False)
class EvalStep:
    """``eval_step(state, batch) -> metrics``; see :func:`make_eval_step`."""

    model: torch.nn.Module
    metrics_fn: Callable[[Callable[..., Any], Any], Mapping[str, Any]]
    precision: Precision = "32"

    def __post_init__(self) -> None:
        _check_model(self.model)
        object.__setattr__(self, "model", _template(self.model, self.metrics_fn))  # (as TrainStep's)
        object.__setattr__(self, "_call", _Functional(self.model))

    def __call__(self, state: TrainState, batch: Any) -> Metrics:
        self._call.check(state)
        _set_mode(self.model, False)

        def model_fn(*args: Any, **kwargs: Any) -> Any:
            return self._call(state.params, state.buffers, args, kwargs)

        with torch.no_grad(), _explain_traps(), autocast(self.precision, state.step.device):
            out = self.metrics_fn(model_fn, batch)
        if not isinstance(out, Mapping):
            raise TypeError(f"metrics_fn must return a dict of scalar metrics, got {type(out).__name__}")
        return {k: torch.as_tensor(v).detach().float().reshape(()) for k, v in out.items()}


def make_eval_step(model: torch.nn.Module, metrics_fn: Callable[[Callable[..., Any], Any], Mapping[str, Any]],
                   *, precision: Precision = "32", ensemble: bool = False, member_batches: bool = False) -> Any:
    """Build ``eval_step(state, batch) -> metrics``: no gradients, eval-mode dropout
    and BatchNorm (running statistics are read, never updated).

    ``metrics_fn(model_fn, batch)`` returns a dict of per-batch means; the
    Trainer averages them over batches weighted by batch size.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> def metrics_fn(model_fn, batch):
        ...     x, y = batch
        ...     logits = model_fn(x)
        ...     return {"loss": torch.nn.functional.cross_entropy(logits, y),
        ...             "acc": (logits.argmax(-1) == y).float().mean()}
        >>> eval_step = make_eval_step(model, metrics_fn)
        >>> state = fnlight.TrainState.create(model, fo.sgd(0.1), seed=0)
        >>> sorted(eval_step(state, (torch.randn(8, 4), torch.randint(0, 3, (8,)))))
        ['acc', 'loss']

    With ``ensemble=True`` it evaluates a stacked state (metrics of shape ``[members]``; with
    ``member_batches=True`` one batch per member).
    """
    checks.check_metrics_fn(metrics_fn)
    if ensemble:
        from .ensemble import EnsembleEvalStep
        return EnsembleEvalStep(model, metrics_fn, precision, member_batches)
    return EvalStep(model, metrics_fn, precision)
