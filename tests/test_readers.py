"""Readers (read_csv, read_npz, read_safetensors) and in-memory sources (from_tensors,
from_torch, digits)."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fnlight
import fnlight.data as fd

CSV = "1,2,0\n3,4,1\n5,6,2\n"


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _via_download(path: Path, read: fd.Reader, root: Path):
    """Read ``path`` the way users do: through a ``file://`` download."""
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return fd.download(path.as_uri(), sha256=sha, read=read).load(fd.Context(root=root))


def _all(ds: fd.Dataset):
    return ds[torch.arange(len(ds))]


# -- read_csv ------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_read_csv_label_last(tmp_path, compress):
    data = gzip.compress(CSV.encode()) if compress else CSV.encode()
    path = _write(tmp_path / ("t.csv.gz" if compress else "t.csv"), data)
    ds = fd.read_csv()(path)
    assert isinstance(ds, fd.TensorDataset) and len(ds) == 3
    x, y = _all(ds)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.tensor([[1.0, 2], [3, 4], [5, 6]]))
    assert torch.equal(y, torch.tensor([0, 1, 2]))
    x0, y0 = ds[0]
    assert torch.equal(x0, torch.tensor([1.0, 2])) and int(y0) == 0


def test_read_csv_gzip_through_download(tmp_path):
    path = _write(tmp_path / "t.csv.gz", gzip.compress(CSV.encode()))
    ds = _via_download(path, fd.read_csv(label=-1), tmp_path / "root")
    x, y = _all(ds)
    assert torch.equal(x, torch.tensor([[1.0, 2], [3, 4], [5, 6]]))
    assert torch.equal(y, torch.tensor([0, 1, 2]))


def test_read_csv_label_first(tmp_path):
    path = _write(tmp_path / "t.csv", CSV)
    x, y = _all(fd.read_csv(label=0)(path))
    assert torch.equal(x, torch.tensor([[2.0, 0], [4, 1], [6, 2]]))
    assert torch.equal(y, torch.tensor([1, 3, 5]))


def test_read_csv_without_label(tmp_path):
    path = _write(tmp_path / "t.csv", CSV)
    ds = fd.read_csv(label=None)(path)
    x = _all(ds)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert torch.equal(x, torch.tensor([[1.0, 2, 0], [3, 4, 1], [5, 6, 2]]))


def test_read_csv_single_row(tmp_path):
    path = _write(tmp_path / "t.csv", "1.5,2.5,7\n")
    x, y = _all(fd.read_csv()(path))
    assert x.shape == (1, 2) and y.tolist() == [7]


def test_read_csv_dtypes(tmp_path):
    path = _write(tmp_path / "t.csv", "0.1,2,0\n0.3,4,1\n")
    x, y = _all(fd.read_csv(dtype="float64", label_dtype="int32")(path))
    assert x.dtype == torch.float64 and y.dtype == torch.int32
    assert x[0, 0].item() == 0.1  # parsed as float64, not through float32
    x, y = _all(fd.read_csv(dtype=torch.float16, label_dtype=torch.float32)(path))
    assert x.dtype == torch.float16 and y.dtype == torch.float32
    ints = _write(tmp_path / "i.csv", "1,2\n3,4\n")
    x = _all(fd.read_csv(label=None, dtype="int64")(ints))
    assert x.dtype == torch.int64 and x.tolist() == [[1, 2], [3, 4]]


def test_read_csv_dtype_is_stored_by_name():
    assert fd.read_csv(dtype=torch.float64) == fd.read_csv(dtype="float64")
    assert fd.read_csv(dtype=torch.float64).describe() == {
        "reader": "read_csv", "label": -1, "dtype": "float64", "label_dtype": "int64",
        "delimiter": ",", "skip_rows": 0,
    }


@pytest.mark.parametrize("bad", ["nn", "Tensor", "not_a_dtype"])
def test_read_csv_unknown_dtype(bad):
    with pytest.raises(ValueError, match="unknown dtype"):
        fd.read_csv(dtype=bad)
    with pytest.raises(ValueError, match="unknown dtype"):
        fd.read_csv(label_dtype=bad)


def test_read_csv_header_and_delimiter(tmp_path):
    path = _write(tmp_path / "h.csv", "a;b;label\n1;2;0\n3;4;1\n")
    x, y = _all(fd.read_csv(delimiter=";", skip_rows=1)(path))
    assert torch.equal(x, torch.tensor([[1.0, 2], [3, 4]]))
    assert y.tolist() == [0, 1]
    with pytest.raises(ValueError, match="skip_rows="):
        fd.read_csv(delimiter=";")(path)  # the header is not numeric


def test_read_csv_header_through_download(tmp_path):
    path = _write(tmp_path / "h.csv", "a,b,label\n1,2,0\n3,4,1\n")
    x, y = _all(_via_download(path, fd.read_csv(skip_rows=1), tmp_path / "root"))
    assert x.tolist() == [[1.0, 2.0], [3.0, 4.0]] and y.tolist() == [0, 1]


@pytest.mark.parametrize("text", ["x,y\nfoo,bar\n", "1,2\n3\n", "1,2,3\n4,five,6\n"])
def test_read_csv_not_numeric(tmp_path, text):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match="not a numeric CSV table") as info:
        fd.read_csv()(path)
    assert str(path) in str(info.value)


@pytest.mark.filterwarnings("ignore:loadtxt")
def test_read_csv_empty_file(tmp_path):
    path = _write(tmp_path / "empty.csv", "")
    with pytest.raises(ValueError, match="no rows"):
        fd.read_csv()(path)


@pytest.mark.parametrize("label", [3, -4, 10])
def test_read_csv_bad_label_column(tmp_path, label):
    path = _write(tmp_path / "t.csv", CSV)
    with pytest.raises(ValueError, match=rf"label column {label} does not exist.*3 columns"):
        fd.read_csv(label=label)(path)


def test_read_csv_negative_label_in_range(tmp_path):
    path = _write(tmp_path / "t.csv", CSV)
    x, y = _all(fd.read_csv(label=-3)(path))
    assert y.tolist() == [1, 3, 5] and x.tolist() == [[2.0, 0.0], [4.0, 1.0], [6.0, 2.0]]


# -- read_npz ------------------------------------------------------------------


@pytest.fixture
def npz(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(12, dtype=np.float32).reshape(6, 2), y=np.arange(6) % 2,
             x_test=np.ones((2, 2), dtype=np.float32), y_test=np.array([1, 0]))
    return path


def test_read_npz_keys(npz):
    ds = fd.read_npz(("x", "y"))(npz)
    assert len(ds) == 6
    x, y = _all(ds)
    assert x.dtype == torch.float32 and torch.equal(x, torch.arange(12.0).reshape(6, 2))
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 0, 1, 0, 1]
    x3, y3 = ds[3]
    assert x3.tolist() == [6.0, 7.0] and int(y3) == 1


def test_read_npz_single_key(npz):
    ds = fd.read_npz("x")(npz)
    assert fd.read_npz("x") == fd.read_npz(["x"])
    sample = ds[2]
    assert isinstance(sample, torch.Tensor) and sample.tolist() == [4.0, 5.0]


def test_read_npz_all_arrays_as_dicts(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, a=np.arange(3), b=np.zeros((3, 4), dtype=np.float64))
    ds = fd.read_npz()(path)
    sample = ds[1]
    assert isinstance(sample, dict) and set(sample) == {"a", "b"}
    assert int(sample["a"]) == 1 and sample["b"].shape == (4,)
    assert sample["b"].dtype == torch.float64


def test_read_npz_splits(npz, tmp_path):
    read = fd.read_npz(splits={"train": ("x", "y"), "test": ("x_test", "y_test")})
    for splits in (read(npz), _via_download(npz, read, tmp_path / "root")):
        assert isinstance(splits, fd.Splits)
        assert list(splits) == ["train", "test"]
        assert len(splits["train"]) == 6 and len(splits["test"]) == 2
        x, y = _all(splits["test"])
        assert x.tolist() == [[1.0, 1.0], [1.0, 1.0]] and y.tolist() == [1, 0]


def test_read_npz_splits_through_datamodule(npz, tmp_path):
    sha = hashlib.sha256(npz.read_bytes()).hexdigest()
    src = fd.download(npz.as_uri(), sha256=sha,
                      read=fd.read_npz(splits={"train": ("x", "y"), "test": ("x_test", "y_test")}))
    dm = fnlight.DataModule(src >> fd.batch(4), root=tmp_path / "root", prefetch=0)
    assert dm.split_names == ["train", "test"]
    assert dm.num_batches("train") == 2 and dm.num_batches("test") == 1


def test_read_npz_missing_key(npz):
    with pytest.raises(KeyError, match="'z'"):
        fd.read_npz(("x", "z"))(npz)


class _Payload:
    """Unpickling this creates a directory: proof that a pickle ran."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_read_npz_refuses_object_arrays(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([_Payload(sentinel), 1], dtype=object), y=np.arange(2))
    with pytest.raises(ValueError, match="allow_pickle"):
        fd.read_npz(("x", "y"))(path)
    with pytest.raises(ValueError, match="allow_pickle"):
        fd.read_npz(("y",))(path)  # the object array is refused even when not asked for
    assert not sentinel.exists()
    # The payload is real: unpickling the archive would have run it.
    with np.load(path, allow_pickle=True) as z:
        z["x"]
    assert sentinel.exists()


def test_read_npz_refuses_a_pickle_file(tmp_path):
    import pickle

    sentinel = tmp_path / "pwned"
    path = _write(tmp_path / "evil.npz", pickle.dumps({"x": _Payload(sentinel)}))
    with pytest.raises(ValueError, match="pickle"):
        fd.read_npz()(path)
    assert not sentinel.exists()


# -- read_safetensors ----------------------------------------------------------


@pytest.fixture
def st(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.arange(10.0).reshape(5, 2), "y": torch.tensor([4, 3, 2, 1, 0]),
               "x_val": torch.zeros(3, 2), "y_val": torch.ones(3, dtype=torch.int64)}, str(path))
    return path


def test_read_safetensors_keys(st, tmp_path):
    for ds in (fd.read_safetensors(("x", "y"))(st),
               _via_download(st, fd.read_safetensors(("x", "y")), tmp_path / "root")):
        assert len(ds) == 5
        x, y = _all(ds)
        assert torch.equal(x, torch.arange(10.0).reshape(5, 2))
        assert y.tolist() == [4, 3, 2, 1, 0]
    assert fd.read_safetensors("y")(st)[1].item() == 3


def test_read_safetensors_all_arrays_need_one_length(st):
    with pytest.raises(fd.ShapeError):
        fd.read_safetensors()(st)  # "x" has 5 rows, "x_val" 3


def test_read_safetensors_splits(st):
    splits = fd.read_safetensors(splits={"train": ["x", "y"], "val": ["x_val", "y_val"]})(st)
    assert isinstance(splits, fd.Splits)
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "val": 3}
    x, y = _all(splits["val"])
    assert torch.equal(x, torch.zeros(3, 2)) and y.tolist() == [1, 1, 1]
    with pytest.raises(KeyError, match="nope"):
        fd.read_safetensors(("x", "nope"))(st)


def test_reader_descriptions_differ():
    descs = [
        fd.read_npz(("x", "y")).describe(),
        fd.read_npz(("y", "x")).describe(),
        fd.read_npz().describe(),
        fd.read_npz(splits={"train": "x"}).describe(),
        fd.read_safetensors(("x", "y")).describe(),
    ]
    assert descs[0] == {"reader": "read_npz", "keys": ["x", "y"], "splits": None}
    assert all(a != b for i, a in enumerate(descs) for b in descs[i + 1:])


# -- from_tensors --------------------------------------------------------------


def test_from_tensors_positional():
    x, y = torch.arange(8.0).reshape(4, 2), torch.tensor([3, 2, 1, 0])
    ds = fd.from_tensors(x, y).load(fd.Context())
    assert len(ds) == 4
    xi, yi = ds[1]
    assert xi.tolist() == [2.0, 3.0] and int(yi) == 2
    bx, by = ds[torch.tensor([3, 0])]
    assert torch.equal(bx, x[[3, 0]]) and torch.equal(by, y[[3, 0]])


def test_from_tensors_single():
    ds = fd.from_tensors(torch.arange(5)).load(fd.Context())
    assert isinstance(ds[2], torch.Tensor) and int(ds[2]) == 2
    assert _all(ds).tolist() == [0, 1, 2, 3, 4]


def test_from_tensors_named():
    ds = fd.from_tensors(image=torch.zeros(3, 2, 2), label=torch.tensor([7, 8, 9])).load(
        fd.Context())
    sample = ds[2]
    assert set(sample) == {"image", "label"} and int(sample["label"]) == 9
    assert sample["image"].shape == (2, 2)


def test_from_tensors_mismatched_first_dims():
    with pytest.raises(fd.ShapeError, match="first dimension"):
        fd.from_tensors(torch.zeros(4, 2), torch.zeros(5))
    with pytest.raises(fd.ShapeError):
        fd.from_tensors(a=torch.zeros(4), b=torch.zeros(3))
    with pytest.raises(fd.ShapeError):
        fd.from_tensors(torch.tensor(1.0))  # a scalar has no samples


def test_from_tensors_bad_arguments():
    with pytest.raises(TypeError, match="at least one"):
        fd.from_tensors()
    with pytest.raises(TypeError, match="not both"):
        fd.from_tensors(torch.zeros(2), y=torch.zeros(2))
    with pytest.raises(TypeError):
        fd.from_tensors([1, 2, 3])


def test_from_tensors_describe_follows_the_data():
    x = torch.arange(6.0)
    a = fd.from_tensors(x, torch.zeros(6))
    assert a.describe() == fd.from_tensors(x.clone(), torch.zeros(6)).describe()
    changed = x.clone()
    changed[3] = -1.0
    others = [
        fd.from_tensors(changed, torch.zeros(6)),
        fd.from_tensors(x.double(), torch.zeros(6)),
        fd.from_tensors(x),
        fd.from_tensors(a=x, b=torch.zeros(6)),
    ]
    shas = {s.describe()["sha256"] for s in [a, *others]}
    assert len(shas) == len(others) + 1
    assert (a >> fd.batch(2)).fingerprint != (others[0] >> fd.batch(2)).fingerprint


# -- from_torch ----------------------------------------------------------------


class _NumpyDataset(torch.utils.data.Dataset):
    """A map-style dataset of (numpy array, int) samples."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return np.full(3, i, dtype=np.float32), i * 10


def _batches(source: fd.Source, size: int = 4):
    return list(fnlight.DataModule(source >> fd.batch(size), prefetch=0).batches("train"))


def test_from_torch_tensor_dataset():
    x, y = torch.rand(10, 3), torch.arange(10)
    batches = _batches(fd.from_torch(torch.utils.data.TensorDataset(x, y)))
    assert len(batches) == 3
    for b, (bx, by) in enumerate(batches):
        assert torch.equal(bx, x[4 * b:4 * b + 4]) and torch.equal(by, y[4 * b:4 * b + 4])


def test_from_torch_custom_dataset_of_numpy_and_ints():
    src = fd.from_torch(_NumpyDataset(6))
    sample = src.load(fd.Context())["train"][1]
    assert isinstance(sample[0], torch.Tensor) and sample[0].dtype == torch.float32
    assert int(sample[1]) == 10
    batches = _batches(src)
    assert len(batches) == 2
    bx, by = batches[0]
    assert torch.equal(bx, torch.arange(4, dtype=torch.float32)[:, None].expand(4, 3))
    assert by.dtype == torch.int64 and by.tolist() == [0, 10, 20, 30]
    bx, by = batches[1]
    assert bx.shape == (2, 3) and by.tolist() == [40, 50]


def test_from_torch_named_splits():
    src = fd.from_torch(train=_NumpyDataset(5), val=_NumpyDataset(2))
    splits = src.load(fd.Context())
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "val": 2}
    desc = src.describe()
    assert "unstable" in desc and "fingerprint=" in desc["unstable"]  # content cannot be hashed cheaply
    assert desc["datasets"]["val"] == {"type": f"{__name__}._NumpyDataset", "len": 2}
    assert not src.content_hashed
    with pytest.raises(fd.FingerprintError, match="fingerprint="):
        _ = (src >> fd.batch(2)).fingerprint
    named = fd.from_torch(train=_NumpyDataset(5), fingerprint="numpy-v1")
    assert named.content_hashed and named.describe()["fingerprint"] == "numpy-v1"
    tds = fd.from_torch(torch.utils.data.TensorDataset(torch.zeros(3, 2)))
    other = fd.from_torch(torch.utils.data.TensorDataset(torch.ones(3, 2)))
    assert tds.content_hashed and tds.describe() != other.describe()  # TensorDatasets are hashed
    with pytest.raises(TypeError, match="not both"):
        fd.from_torch(_NumpyDataset(2), val=_NumpyDataset(2))
    with pytest.raises(TypeError, match="needs a dataset"):
        fd.from_torch()


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(3)


class _SizedStream(_Stream):
    def __len__(self) -> int:
        return 3


def test_from_torch_rejects_iterable_dataset():
    with pytest.raises(TypeError, match="map-style"):
        fd.from_torch(_Stream())
    with pytest.raises(TypeError, match="map-style"):
        fd.from_torch(train=_NumpyDataset(2), val=_Stream())


def test_from_torch_rejects_sized_iterable_dataset():
    with pytest.raises(TypeError, match="map-style"):
        fd.from_torch(_SizedStream())


# -- digits --------------------------------------------------------------------


def test_digits():
    ds = fd.digits().load(fd.Context())
    assert len(ds) == 1797
    x, y = _all(ds)
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min().item() == 0 and x.max().item() == 16
    assert torch.equal(x, x.round())  # integer pixel values
    assert y.min().item() == 0 and y.max().item() == 9
    assert torch.equal(torch.unique(y), torch.arange(10))
    assert (torch.bincount(y) > 150).all()  # roughly balanced
    x0, y0 = ds[0]
    assert x0.shape == (64,) and y0.shape == ()


def test_digits_describe_is_its_content_hash():
    from importlib import resources

    data = (resources.files("fnlight.data") / "digits.csv.gz").read_bytes()
    assert fd.digits().describe() == {"stage": "digits",
                                      "sha256": hashlib.sha256(data).hexdigest()}
    assert fd.digits() == fd.digits()
    assert (fd.digits() >> fd.batch(64)).fingerprint == (fd.digits() >> fd.batch(64)).fingerprint


def test_csv_with_a_label_needs_a_feature_column(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("1\n2\n")
    with pytest.raises(ValueError, match="label=None"):
        fd.read_csv(label=-1)(path)
    assert fd.read_csv(label=None)(path)[0].shape == (1,)


def test_npz_reader_refuses_npy_and_string_arrays(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    with pytest.raises(ValueError, match="not an .npz archive"):
        fd.read_npz()(tmp_path / "a.npy")
    np.savez(tmp_path / "s.npz", s=np.array(["a", "b"]))
    with pytest.raises(TypeError, match=r"s\.npz: array 's'"):
        fd.read_npz()(tmp_path / "s.npz")
