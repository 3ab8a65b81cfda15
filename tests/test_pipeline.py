import functools
import json
import os
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fnlight.data as fd

from . import pipelines

ROOT = Path(__file__).resolve().parents[1]


def test_stages_are_frozen_hashable_and_compose():
    b = fd.batch(4)
    with pytest.raises(FrozenInstanceError):
        b.size = 5
    assert hash(b) == hash(fd.batch(4)) and b == fd.batch(4) and b != fd.batch(5)
    src = fd.from_tensors(torch.zeros(4))
    p1 = src >> (fd.shuffle() >> b)
    p2 = (src >> fd.shuffle()) >> b
    assert p1 == p2 and p1.stages == (src, fd.shuffle(), b)  # pipelines flatten
    assert len(p1 >> p1) == 6
    hash(p1)


@pytest.mark.parametrize("bad", [3, "batch", None, lambda x: x])
def test_rshift_with_a_non_stage_is_a_clear_error(bad):
    with pytest.raises(TypeError, match="composes fnlight stages"):
        fd.batch(2) >> bad
    with pytest.raises(TypeError, match="composes fnlight stages"):
        bad >> fd.batch(2)
    with pytest.raises(TypeError, match="composes fnlight stages"):
        (fd.from_tensors(torch.zeros(2)) >> fd.batch(2)) >> bad


def test_describe_is_json_and_names_every_hyperparameter():
    desc = pipelines.make().describe()
    text = json.dumps(desc)
    assert [s["stage"] for s in desc["stages"]] == ["from_tensors", "split", "transform", "transform",
                                                    "shuffle", "batch"]
    assert desc["stages"][1]["parts"] == [["train", 0.75], ["val", 0.25]]
    assert desc["stages"][2]["fn"]["function"] == "tests.pipelines.noisy"
    assert "source_sha256" in desc["stages"][2]["fn"]
    assert desc["stages"][5]["size"] == 8
    assert "float32" in text or "sha256" in text


def test_fingerprint_is_stable_across_processes():
    here = pipelines.make().fingerprint
    code = "from tests import pipelines; print(pipelines.make().fingerprint)"
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == here and len(here) == 64


configs = st.fixed_dictionaries({
    "batch_size": st.integers(1, 16),
    "seed": st.integers(0, 3),
    "fractions": st.sampled_from([(0.75, 0.25), (0.5, 0.5), (0.9, 0.1)]),
    "drop_last": st.booleans(),
    "factor": st.sampled_from([1.0, 2.0, 3.5]),
})


@given(a=configs, b=configs)
def test_fingerprint_changes_with_any_hyperparameter(a, b):
    assert (pipelines.make(**a).fingerprint == pipelines.make(**b).fingerprint) == (a == b)


def test_fingerprint_follows_data_and_function_source():
    x, y = pipelines.data()
    p = fd.from_tensors(x, y) >> fd.batch(4)
    x2 = x.clone()
    x2[0, 0, 0] += 1
    assert p.fingerprint != (fd.from_tensors(x2, y) >> fd.batch(4)).fingerprint
    assert (fd.from_tensors(x.clone(), y) >> fd.batch(4)).fingerprint == p.fingerprint

    def f(v):
        return v + 1

    def g(v):
        return v + 2

    fp = (p >> fd.transform(f)).fingerprint
    assert fp != (p >> fd.transform(g)).fingerprint
    # functools.partial and closures are described by their arguments / captured values
    assert (p >> fd.transform(functools.partial(torch.add, other=1))).fingerprint != \
        (p >> fd.transform(functools.partial(torch.add, other=2))).fingerprint
    assert (p >> fd.transform(pipelines.scale_by(2.0))).fingerprint != \
        (p >> fd.transform(pipelines.scale_by(3.0))).fingerprint


def test_undescribable_functions_are_flagged_not_randomly_fingerprinted():
    namespace: dict = {}
    exec("def f(x):\n    return x\n", namespace)  # no source file: cannot be described
    p = fd.from_tensors(torch.zeros(4)) >> fd.transform(namespace["f"]) >> fd.batch(2)
    desc = p.describe()
    assert "unstable" in desc["stages"][1]["fn"]
    with pytest.raises(fd.FingerprintError, match=r"stages\[1\]\.fn"):
        _ = p.fingerprint

    class Opaque:
        def __call__(self, x):
            return x

    p2 = fd.from_tensors(torch.zeros(4)) >> fd.transform(Opaque()) >> fd.batch(2)
    with pytest.raises(fd.FingerprintError, match="callable object"):
        _ = p2.fingerprint


def test_a_pipeline_must_start_with_exactly_one_source():
    with pytest.raises(ValueError, match="starts with a source"):
        (fd.batch(2) >> fd.shuffle()).build(fd.Context())
    with pytest.raises(ValueError, match="only be the first"):
        (fd.from_tensors(torch.zeros(2)) >> fd.from_tensors(torch.zeros(2))).build(fd.Context())


def test_unknown_split_in_on_is_an_error():
    p = fd.from_tensors(torch.zeros(10)) >> fd.split({"train": 0.5, "val": 0.5})
    for stage in (fd.transform(pipelines.normalize, on="tset"), fd.shuffle(on=("train", "tset")),
                  fd.batch(2, on="tset"), fd.shard(0, 1, on="tset"), fd.cache(on="tset")):
        with pytest.raises(ValueError, match=r"unknown split\(s\) \['tset'\].*'train', 'val'"):
            (p >> stage).build(fd.Context())


def test_order_constraints_give_clear_errors():
    src = fd.from_tensors(torch.zeros(10))
    with pytest.raises(ValueError, match="before shuffle"):
        (src >> fd.shuffle() >> fd.split({"a": 0.5, "b": 0.5})).build(fd.Context())
    with pytest.raises(ValueError, match="after batch"):
        (src >> fd.to_device("cpu") >> fd.batch(2)).build(fd.Context())
    with pytest.raises(ValueError, match="twice"):
        (src >> fd.batch(2) >> fd.batch(3)).build(fd.Context())
    with pytest.raises(ValueError, match="freeze its randomness"):
        (src >> fd.transform(pipelines.hflip) >> fd.cache()).build(fd.Context())
    with pytest.raises(ValueError, match="needs of="):
        (fd.from_torch(a=torch.utils.data.TensorDataset(torch.zeros(4)),
                       b=torch.utils.data.TensorDataset(torch.zeros(4)))
         >> fd.split({"x": 0.5, "y": 0.5})).build(fd.Context())


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_batch_size_must_be_positive(size):
    with pytest.raises(ValueError, match="positive int"):
        fd.batch(size)


def test_part_order_is_part_of_the_fingerprint():
    src = fd.from_tensors(torch.arange(10))
    a = src >> fd.split({"train": 0.8, "val": 0.2})
    b = src >> fd.split({"val": 0.2, "train": 0.8})
    assert a.fingerprint != b.fingerprint


def test_two_lambdas_on_one_line_are_told_apart():
    fns = [lambda x: x + 1, lambda x: x * 100]  # noqa: E731 (the point of the test)
    src = fd.from_tensors(torch.ones(4))
    assert (src >> fd.transform(fns[0])).fingerprint != (src >> fd.transform(fns[1])).fingerprint


def test_a_recursive_function_is_described():
    def walk(x, depth=2):
        return x if depth == 0 else walk(x, depth - 1)

    assert len((fd.from_tensors(torch.ones(4)) >> fd.transform(walk)).fingerprint) == 64


MODULE = """
import torch
SCALE = {scale}

def helper(x):
    return x * {factor}

def scale(x):
    return helper(x) * SCALE
"""


def test_globals_and_helpers_of_the_module_are_part_of_the_fingerprint(tmp_path):
    def fingerprint(scale, factor):
        (tmp_path / "userfns.py").write_text(MODULE.format(scale=scale, factor=factor))
        code = ("import sys, torch, fnlight.data as fd; sys.path.insert(0, sys.argv[1]); import userfns;"
                "print((fd.from_tensors(torch.ones(3)) >> fd.transform(userfns.scale)).fingerprint)")
        return subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                              check=True, cwd=ROOT).stdout.strip()

    base = fingerprint(1.0, 2.0)
    assert fingerprint(1.0, 2.0) == base
    assert fingerprint(5.0, 2.0) != base  # a module constant the function reads
    assert fingerprint(1.0, 7.0) != base  # a helper of the same module it calls


def test_transform_random_detection_ignores_parameters_with_defaults():
    def normalize(x, mean=0.5, std=0.25):
        return (x - mean) / std

    t = fd.transform(normalize)
    assert not t.random
    dm = fd.DataModule(fd.from_tensors(torch.ones(3)) >> t >> fd.batch(3))
    assert torch.equal(next(iter(dm.batches("train"))), torch.full((3,), 2.0))
