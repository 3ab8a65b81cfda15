import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

from fnlight.tree import device_put, register_node, tree_equal, tree_first_difference, tree_hash, tree_leaves, tree_map

from .conftest import cuda


class Pair:
    def __init__(self, a, b):
        self.a, self.b = a, b


register_node(Pair, lambda p: ((p.a, p.b), None), lambda _, c: Pair(*c))


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_tree_map_sees_registered_and_builtin_containers():
    t = {"p": Pair(torch.ones(2), 3), "n": Batch(torch.zeros(1), torch.ones(1))}
    out = tree_map(lambda v: v * 2, t)
    assert isinstance(out["p"], Pair) and torch.equal(out["p"].a, torch.full((2,), 2.0)) and out["p"].b == 6
    assert isinstance(out["n"], Batch)
    assert len(tree_leaves(t)) == 4


def test_tree_equal_is_bitwise():
    a = {"w": torch.tensor([1.0, float("nan")]), "s": 3}
    assert tree_equal(a, {"w": torch.tensor([1.0, float("nan")]), "s": 3})
    assert not tree_equal(torch.tensor(0.0), torch.tensor(-0.0))
    assert not tree_equal(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))
    assert not tree_equal(torch.tensor([1.0]), torch.tensor([[1.0]]))
    assert not tree_equal((torch.ones(1),), [torch.ones(1)])
    assert not tree_equal({"s": 3}, {"s": 4})
    nextafter = torch.nextafter(torch.tensor([1.0]), torch.tensor([2.0]))
    assert not tree_equal(torch.tensor([1.0]), nextafter)


def test_first_difference_names_the_leaf():
    a = {"layer": {"w": torch.zeros(3), "b": torch.zeros(1)}}
    b = {"layer": {"w": torch.tensor([0.0, 0.0, 1.0]), "b": torch.zeros(1)}}
    msg = tree_first_difference(a, b)
    assert msg.startswith("tree['layer']['w']: float32[3], 1 of 3 elements differ") and "flat index 2" in msg
    assert tree_first_difference(a, a) is None
    assert "structures differ" in tree_first_difference(a, {"layer": {"w": torch.zeros(3)}})


def test_device_put_moves_tensor_leaves_only():
    t = {"x": torch.ones(2), "meta": "text", "p": Pair(torch.zeros(1), 1)}
    out = device_put(t, "meta")
    assert out["x"].device.type == "meta" and out["p"].a.device.type == "meta"
    assert out["meta"] == "text" and out["p"].b == 1
    assert device_put(t, None) is t
    assert device_put(t, "cpu")["x"] is t["x"]  # already there: not copied


@cuda
def test_device_put_cuda_roundtrip():
    t = {"x": torch.arange(10.0)}
    g = device_put(t, "cuda", non_blocking=True)
    assert g["x"].is_cuda
    assert tree_equal(device_put(g, "cpu"), t)


def test_tree_hash_is_stable_and_sensitive():
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": (torch.ones(2), 5)}
    h = tree_hash(t)
    assert h == tree_hash({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": (torch.ones(2), 5)})
    assert h == tree_hash({"a": torch.arange(6, dtype=torch.float32).reshape(3, 2).T.contiguous().T.reshape(2, 3),
                           "b": (torch.ones(2), 5)})
    variants = [
        {"a": t["a"].double(), "b": t["b"]},
        {"a": t["a"].reshape(3, 2), "b": t["b"]},
        {"a": t["a"] + 1, "b": t["b"]},
        {"a": t["a"], "b": (torch.ones(2), 6)},
        {"a": t["a"], "b": [torch.ones(2), 5]},
        {"x": t["a"], "b": t["b"]},
    ]
    assert len({h, *(tree_hash(v) for v in variants)}) == 1 + len(variants)
    code = ("import torch; from fnlight.tree import tree_hash;"
            "print(tree_hash({'a': torch.arange(6, dtype=torch.float32).reshape(2, 3), 'b': (torch.ones(2), 5)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == h


def test_non_contiguous_tensors_hash_like_their_values():
    x = torch.arange(12.0).reshape(3, 4)
    assert tree_hash(x.T) == tree_hash(x.T.contiguous())


@pytest.mark.parametrize("dtype", [torch.bool, torch.bfloat16, torch.int8, torch.complex64])
def test_all_dtypes_hash_and_compare(dtype):
    x = torch.ones(3, dtype=dtype)
    assert tree_equal(x, x.clone()) and tree_hash(x) == tree_hash(x.clone())


def test_conjugate_and_negative_views_hash_like_their_values():
    z = torch.tensor([1 + 2j, 3 - 1j])
    assert tree_hash(z.conj()) == tree_hash(z.conj().resolve_conj())
    assert tree_equal(z.conj(), z.conj().resolve_conj())
