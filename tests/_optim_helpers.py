"""Shared fixtures of the optimizer tests: a few parameter shapes and gradient-like values that
depend on the current parameters (like a real loss), in float32 or float64."""

import torch

import fnlight.optim as fo

SHAPES = {"w1": (7, 5), "b1": (7,), "w2": (3, 7, 2), "scale": (), "b2": (1,)}


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()}


def grads_at(step, params, shapes=SHAPES):
    g = torch.Generator().manual_seed(1000 + step)
    return {k: torch.randn(params[k].shape, generator=g, dtype=torch.float64).to(params[k].dtype) * 0.1
            + 0.05 * params[k] for k in shapes}


def run_torch(cls, steps, dtype=torch.float32, **kw):
    params = {k: torch.nn.Parameter(v.clone()) for k, v in make_params(dtype).items()}
    opt = cls(list(params.values()), **kw)
    for t in range(steps):
        gs = grads_at(t, {k: p.detach() for k, p in params.items()})
        for k, p in params.items():
            p.grad = gs[k]
        opt.step()
    return {k: p.detach() for k, p in params.items()}


def run_fnlight(opt, steps, dtype=torch.float32, mode="step", inplace=False):
    params = make_params(dtype)
    state = opt.init(params)
    for t in range(steps):
        g = grads_at(t, params)
        if mode == "step":
            params, state = fo.step(opt, g, state, params, inplace=inplace)
        else:
            updates, state = opt.update(g, state, params, inplace=inplace)
            params = fo.apply_updates(params, updates, inplace=inplace)
    return params


def max_rel(got, want):
    """The largest difference relative to each tensor's largest value (a per-element ratio blows up
    where a value crosses zero)."""
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-30)) for k in want)


# every kind of per_tensor optimizer (fnlight.optim.GradientTransformation.per_tensor), with options that use its state
PER_TENSOR = {
    "sgd": lambda: fo.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam-amsgrad-l2": lambda: fo.adam(1e-2, weight_decay=0.1, amsgrad=True),
    "adamw-schedule": lambda: fo.adamw(fo.warmup_cosine(1e-2, 2, 10), weight_decay=0.1),
    "adamw-foreach": lambda: fo.adamw(1e-2, weight_decay=0.1, fused=False),
    "adamax": lambda: fo.adamax(1e-2, weight_decay=0.01),
    "nadam": lambda: fo.nadam(1e-2),
    "radam": lambda: fo.radam(1e-2, decoupled_weight_decay=True, weight_decay=0.01),
    "adabelief": lambda: fo.adabelief(1e-2),
    "rmsprop": lambda: fo.rmsprop(1e-2, momentum=0.9, centered=True),
    "adagrad": lambda: fo.adagrad(1e-2, lr_decay=0.01),
    "adadelta": lambda: fo.adadelta(1.0),
    "lion": lambda: fo.lion(1e-3),
    "lamb": lambda: fo.lamb(1e-2, weight_decay=0.01),
    "lars": lambda: fo.lars(0.1, weight_decay=1e-3, nesterov=True),
    "adafactor": lambda: fo.adafactor(1e-2, min_dim_size_to_factor=2, momentum=0.9),
    "chain": lambda: fo.chain(fo.scale_by_adam(), fo.add_decayed_weights(0.01), fo.scale_by_learning_rate(1e-2)),
    "inject": lambda: fo.inject_hyperparams(fo.adamw)(learning_rate=1e-2, weight_decay=0.1),
}
