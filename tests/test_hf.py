"""fd.from_hf: a 🤗 datasets.Dataset as a source, on datasets built here (never downloaded)."""

import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fnlight
import fnlight.data as fd
from fnlight.tree import tree_equal

datasets = pytest.importorskip("datasets", reason="🤗 datasets is in the hf and dev extras; not installed here")


def table(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def hf(x, y, **extra):
    return datasets.Dataset.from_dict({"x": x.tolist(), "y": y.tolist(), **extra})


def batches(pipeline, split="train", epoch=0, workers=0):
    with fnlight.DataModule(pipeline, seed=3, workers=workers) as dm:
        return list(dm.batches(split, epoch))


@given(st.integers(8, 40), st.integers(1, 8), st.integers(0, 2**16))
def test_batches_equal_those_of_the_same_tensors(n, size, seed):
    x, y = table(n, seed)
    rest = fd.split({"train": 0.75, "val": 0.25}, seed=1) >> fd.shuffle() >> fd.batch(size)
    ours = batches(fd.from_hf(hf(x, y)) >> rest, epoch=1)
    ref = batches(fd.from_tensors(x=x, y=y) >> rest, epoch=1)
    assert tree_equal(ours, ref)  # integers int64, floats float32 (x is float32: exact)
    assert ours[0]["y"].dtype == torch.int64 and ours[0]["x"].dtype == torch.float32


def test_columns_select_and_a_single_column_gives_tensors():
    x, y = table()
    ds = hf(x, y, text=[f"row {i}" for i in range(len(y))])
    (b,) = batches(fd.from_hf(ds, columns=["y"]) >> fd.batch(20))
    assert list(b) == ["y"] and torch.equal(b["y"], y)
    (b,) = batches(fd.from_hf(ds, columns="x") >> fd.batch(20))
    assert torch.equal(b, x)
    assert torch.equal(fd.from_hf(ds, columns="x").load(fd.Context())["train"][3], x[3])


def test_fingerprint_follows_the_data_and_survives_save_and_load(tmp_path):
    x, y = table()
    pipe = lambda ds: (fd.from_hf(ds) >> fd.shuffle() >> fd.batch(4)).fingerprint  # noqa: E731
    a = pipe(hf(x, y))
    assert pipe(hf(x, y)) == a  # the same data: the same fingerprint
    y2 = y.clone()
    y2[7] += 1
    assert pipe(hf(x, y2)) != a  # one label changed
    assert pipe(hf(x, y).map(lambda r: {"y": r["y"] * 2})) != a  # a transform changes it too
    hf(x, y).save_to_disk(tmp_path / "ds")
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))  # memory-mapped Arrow files
    shutil.copytree(tmp_path / "ds", tmp_path / "copy")
    assert pipe(datasets.load_from_disk(str(tmp_path / "copy"))) == pipe(loaded)  # at every load, from anywhere
    hf(x, y2).save_to_disk(tmp_path / "changed")
    assert pipe(datasets.load_from_disk(str(tmp_path / "changed"))) != pipe(loaded)
    assert tree_equal(batches(fd.from_hf(loaded) >> fd.shuffle() >> fd.batch(4)),
                      batches(fd.from_hf(hf(x, y)) >> fd.shuffle() >> fd.batch(4)))


def test_a_loaded_dataset_feeds_worker_processes(tmp_path):
    x, y = table(40)
    hf(x, y).save_to_disk(tmp_path / "ds")
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    double = fd.transform(lambda s: {"x": s["x"] * 2, "y": s["y"]})
    pipeline = fd.from_hf(loaded) >> double >> fd.shuffle() >> fd.batch(8)
    assert tree_equal(batches(pipeline, workers=2), batches(pipeline))


def test_a_dataset_dict_gives_named_splits():
    x, y = table()
    dd = datasets.DatasetDict(train=hf(x[:15], y[:15]), validation=hf(x[15:], y[15:]))
    with fnlight.DataModule(fd.from_hf(dd) >> fd.batch(5), seed=0) as dm:
        assert dm.split_names == ["train", "validation"]
        assert torch.equal(next(iter(dm.batches("validation")))["x"], x[15:])


def test_clear_errors():
    x, y = table()
    with pytest.raises(TypeError, match=r"column 'text' holds string values.*tokenize.*columns=\[\.\.\.\]"):
        fd.from_hf(hf(x, y, text=["a"] * 20))
    with pytest.raises(ValueError, match=r"no column 'label'.*\['x', 'y'\]"):
        fd.from_hf(hf(x, y), columns=["x", "label"])
    with pytest.raises(TypeError, match="IterableDataset.*streaming=True"):
        fd.from_hf(hf(x, y).to_iterable_dataset())
    with pytest.raises(TypeError, match="datasets.Dataset or DatasetDict, got dict"):
        fd.from_hf({"train": {"x": [1]}})
    ragged = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8]]})
    with pytest.raises(fd.ShapeError, match=r"column 'input_ids'.*different shapes.*padding='max_length'"):
        batches(fd.from_hf(ragged) >> fd.batch(3))


def tiny_gpt2(loss_type=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    if loss_type:
        model.loss_type = loss_type
    return model


def hf_loss(model_fn, batch, key):
    return model_fn(**batch).loss


def test_a_gpt2_ensemble_trains_each_member_as_its_lone_run():
    """Two 🤗 GPT-2 members in one vectorized step (their embeddings get non-contiguous gradients from
    vmap) against the same members trained alone, AdamW, 5 steps. Measured: within 3e-6 (the attention's
    key bias has a gradient that is zero but for rounding, which Adam's normalization magnifies)."""
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel

    import fnlight.optim as fo

    def member(seed, attn_pdrop=0.0):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=attn_pdrop))
        model.loss_type = "ForCausalLM"
        return model

    opt, g = fo.adamw(1e-3), torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, 32, (4, 16), generator=g)), "labels": ids} for _ in range(5)]
    alone = [fnlight.TrainState.create(member(s), opt, seed=s) for s in (0, 1)]
    step = fnlight.make_train_step(member(0), hf_loss, opt, ensemble=True)
    one = fnlight.make_train_step(member(0), hf_loss, opt)
    stacked = fnlight.stack_states(alone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: no batching rule for CPU attention (a loop)
        for batch in data:
            stacked, _ = step(stacked, batch)
    for m, s in zip(fnlight.unstack_states(stacked), alone, strict=True):
        for batch in data:
            s, _ = one(s, batch)
        for k in s.params:
            torch.testing.assert_close(m.params[k], s.params[k], rtol=0, atol=1e-5)
    dropping = fnlight.make_train_step(member(0, 0.1), hf_loss, opt, ensemble=True)
    with pytest.raises(Exception, match="set attention dropout_p=0"):
        dropping(fnlight.stack_states([fnlight.TrainState.create(member(s, 0.1), opt, seed=s) for s in (0, 1)]),
                 data[0])


@pytest.mark.slow
def test_a_hugging_face_step_compiles_to_one_graph_once_its_loss_type_is_set():
    """Without model.loss_type, transformers logs a warning inside the loss: a graph break, which
    fnlight reports with the fix; with it, the step is one graph."""
    import warnings

    from torch._dynamo.testing import CompileCounterWithBackend

    import fnlight.optim as fo

    ids = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    opt = fo.adamw(1e-3)
    unset = tiny_gpt2()
    step = fnlight.make_train_step(unset, hf_loss, opt, compile={"backend": "aot_eager"})
    fix = r'(?s)modeling_utils.py:\d+.*model.loss_type = "ForCausalLM"'
    with pytest.warns(fnlight.train.GraphBreakWarning, match=fix):
        step(fnlight.TrainState.create(unset, opt), batch)
    counter = CompileCounterWithBackend("aot_eager")
    model = tiny_gpt2("ForCausalLM")
    state = fnlight.TrainState.create(model, opt)
    step = fnlight.make_train_step(model, hf_loss, opt, compile={"backend": counter, "fullgraph": True})
    eager = fnlight.make_train_step(model, hf_loss, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fnlight.train.GraphBreakWarning)
        a, ma = step(state, batch)
    b, mb = eager(state, batch)
    assert counter.frame_count == 1
    torch.testing.assert_close(ma["loss"], mb["loss"])
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_hf_gpt2_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "examples/hf_gpt2.py", "--max-steps", "8", "--layers", "1", "--width", "32", "--block", "16",
         "--chars", "4000", "--run-dir", str(tmp_path / "run")],
        cwd=root, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "FNLIGHT_HOME": str(tmp_path),
             "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    first, last = out.stdout.strip().splitlines()
    assert first.startswith("GPT-2 with 13,888 parameters; 498 rows of 16 tokens"), first
    m = __import__("re").fullmatch(r"val loss (\S+) -> (\S+) after 8 steps", last)
    assert m and float(m.group(2)) < float(m.group(1)), last
