"""``fnlight fit --seeds`` / ``--sweep``: members in one vectorized step, checked, summarized, resumed."""

from __future__ import annotations

import json

import fnlight
from fnlight._cli_common import load_target
from fnlight._cli_ensemble import build_members
from fnlight.experiment import digits
from fnlight.train.ensemble import PerMember
from fnlight.tree import tree_equal

from .test_cli import assert_one_line_error, invoke

SETS = ("hidden=16", "dropout=0")
SMALL = ("--set", SETS[0], "--set", SETS[1])


def member_rows(output: str) -> list[list[str]]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["member"])
    rows = []
    for line in lines[start + 1:]:
        if not line.split() or not line.split()[0].isdigit() or "=" not in line.split()[1]:
            break
        rows.append(line.split())
    return rows


def test_seeds_train_members_that_equal_their_own_runs(tmp_path):
    res = invoke("fit", "--seeds", "0,1", "--max-steps", "12", *SMALL, "--run-dir", tmp_path / "ens")
    assert res.exit_code == 0, res.output
    assert "2 members in one vectorized step (--seeds): seed=0, seed=1" in res.output
    rows = member_rows(res.output)
    assert [r[:2] for r in rows] == [["0", "seed=0"], ["1", "seed=1"]]
    assert "best member:" in res.output
    ckpt = sorted((tmp_path / "ens" / "checkpoints").iterdir())[-1]
    state, meta = fnlight.load_checkpoint(ckpt)
    assert meta["hparams"]["labels"] == ["seed=0", "seed=1"]
    assert [m["seed"] for m in meta["hparams"]["members"]] == [0, 1]
    # the seeds' optimizers compute alike: one vectorized optimizer (not one per member)
    members = build_members(load_target(None), SETS, seeds="0,1", sweep=None, max_epochs=None)
    assert not isinstance(members.train_step().optimizer, PerMember)
    # member 1 equals the same experiment trained alone with seed 1 on the first member's data order
    exp = digits(seed=1, hidden=16, dropout=0)
    alone = fnlight.Trainer(max_steps=12, loggers=(), run_dir=tmp_path / "alone").fit(
        exp.init_state(), exp.train_step(), members.first.datamodule)
    member = fnlight.unstack_states(state)[1]
    diff = max(float((member.params[k] - alone.state.params[k]).abs().max()) for k in member.params)
    assert diff < 1e-5, diff
    # the same command again: already finished, nothing trained
    again = invoke("fit", "--seeds", "0,1", "--max-steps", "12", *SMALL, "--run-dir", tmp_path / "ens")
    assert again.exit_code == 0 and "already finished at step 12" in again.output, again.output


def test_sweep_over_a_schedule_peak_uses_one_optimizer_per_member(tmp_path):
    members = build_members(load_target(None), SETS, seeds=None, sweep="lr=1e-3,1e-2", max_epochs=None)
    assert isinstance(members.train_step().optimizer, PerMember)  # the rate is a schedule's peak, not in the state
    res = invoke("fit", "--sweep", "lr=1e-3,1e-2", "--max-steps", "6", *SMALL, "--run-dir", tmp_path / "sweep")
    assert res.exit_code == 0, res.output
    assert [r[:2] for r in member_rows(res.output)] == [["0", "lr=1e-3"], ["1", "lr=1e-2"]]
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss/1" in r for r in rows)


def test_sweeps_that_change_the_model_data_or_length_are_refused(tmp_path):
    assert_one_line_error(invoke("fit", "--sweep", "hidden=16,32", "--max-steps", "2"),
                          "--sweep hidden", "cannot be stacked")
    assert_one_line_error(invoke("fit", "--sweep", "dropout=0.1,0.5", "--set", "hidden=16", "--max-steps", "2"),
                          "--sweep dropout", "dropout=0.5 changes the model or the loss")
    assert_one_line_error(invoke("fit", "--sweep", "batch_size=32,64", *SMALL, "--max-steps", "2"),
                          "reads other data")
    assert_one_line_error(invoke("fit", "--sweep", "max_epochs=1,2", *SMALL), "trains 2 epochs")
    assert_one_line_error(invoke("fit", "--seeds", "0", *SMALL), "two or more")
    assert_one_line_error(invoke("fit", "--seeds", "0,x", *SMALL), "integers")
    assert_one_line_error(invoke("fit", "--seeds", "0,0", *SMALL), "repeat")
    assert_one_line_error(invoke("fit", "--sweep", "lr", *SMALL), "KEY=V1,V2")
    assert_one_line_error(invoke("fit", "--sweep", "lr=3e-3", *SMALL), "--sweep lr takes two or more",
                          "e.g. --sweep lr=1e-3,3e-3;")
    assert_one_line_error(invoke("fit", "--sweep", "lr=1e-3,abc", *SMALL), "bad --sweep lr=abc", "a number")
    assert_one_line_error(invoke("fit", "--sweep", "nope=1,2", *SMALL), "bad --sweep 'nope=1'",
                          "unknown hyperparameter 'nope'")
    assert_one_line_error(invoke("fit", "--seeds", "0,1", "--sweep", "lr=1,2", *SMALL), "together")
    assert_one_line_error(invoke("fit", "--seeds", "0,1", "--devices", "2", *SMALL), "--devices")
    assert not (tmp_path / "runs").exists()


def test_an_interrupted_ensemble_run_resumes_bitwise(tmp_path):
    full = invoke("fit", "--seeds", "3,4", "--max-steps", "10", *SMALL, "--run-dir", tmp_path / "full")
    assert full.exit_code == 0, full.output
    cut = invoke("fit", "--seeds", "3,4", "--max-steps", "4", *SMALL, "--run-dir", tmp_path / "cut")
    assert cut.exit_code == 0, cut.output
    more = invoke("fit", "--seeds", "3,4", "--max-steps", "10", *SMALL, "--run-dir", tmp_path / "cut")
    assert more.exit_code == 0 and "resumed at step 4" in more.output, more.output
    a, _ = fnlight.load_checkpoint(sorted((tmp_path / "full" / "checkpoints").iterdir())[-1])
    b, _ = fnlight.load_checkpoint(sorted((tmp_path / "cut" / "checkpoints").iterdir())[-1])
    assert tree_equal(a, b)


def test_plot_of_an_ensemble_run_draws_one_line_per_member(tmp_path):
    from fnlight._cli_files import curves

    res = invoke("fit", "--seeds", "0,1,2", "--max-epochs", "2", "--max-steps", "30", *SMALL, "--run-dir",
                 tmp_path / "ens")
    assert res.exit_code == 0, res.output
    panels = curves(tmp_path / "ens")
    assert {"val/acc", "val/acc/0", "val/acc/1", "val/acc/2", "train/acc/2"} <= set(panels["acc"])
    assert "acc/0" not in panels  # members are lines of their metric's panel, not panels of their own
    res = invoke("plot", tmp_path / "ens", "-o", tmp_path / "ens.png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_commands_take_an_ensemble_checkpoint(tmp_path):
    res = invoke("fit", "--seeds", "0,1", "--max-steps", "6", *SMALL, "--run-dir", tmp_path / "ens")
    assert res.exit_code == 0, res.output
    test_rows = {r[0]: r for r in member_rows(res.output)}
    run = str(tmp_path / "ens")
    # test: every member and their mean, as fit's own table reported them
    out = invoke("test", "--ckpt", run, "--json")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output.strip().splitlines()[-1])
    assert [m["label"] for m in doc["members"]] == ["seed=0", "seed=1"]
    header = res.output.splitlines()[next(i for i, line in enumerate(res.output.splitlines())
                                          if line.split()[:1] == ["member"])].split()
    col = header.index("test/acc") + 1  # (the label takes a column of its own)
    for i, m in enumerate(doc["members"]):
        assert abs(m["metrics"]["acc"] - float(test_rows[str(i)][col])) < 1e-4
    assert abs(doc["metrics"]["acc"] - sum(m["metrics"]["acc"] for m in doc["members"]) / 2) < 1e-9
    one = invoke("validate", "--ckpt", run, "--member", "1", "--json")
    assert one.exit_code == 0, one.output
    assert json.loads(one.output.strip().splitlines()[-1])["metrics"]["loss"] == \
        json.loads(invoke("validate", "--ckpt", run, "--json").output.strip().splitlines()[-1])["members"][1][
            "metrics"]["loss"]
    # predict and export need one member: a one-line error says how to choose
    assert_one_line_error(invoke("predict", "--ckpt", run, "-o", tmp_path / "p.safetensors"),
                          "holds an ensemble of 2 members (seed=0, seed=1): predict one of them with --member 0..1")
    assert_one_line_error(invoke("test", "--ckpt", run, "--member", "2"), "--member 2: the ensemble has members 0..1")
    pred = invoke("predict", "--ckpt", run, "--member", "1", "-o", tmp_path / "p.safetensors")
    assert pred.exit_code == 0, pred.output
    exp = invoke("export", "--ckpt", run, "--member", "0", "--format", "safetensors", "-o", tmp_path / "m.safetensors")
    assert exp.exit_code == 0 and "it matches the functional model" in exp.output, exp.output
    # a model's own checkpoint has no members
    solo = invoke("fit", "--max-steps", "2", *SMALL, "--run-dir", tmp_path / "solo")
    assert solo.exit_code == 0, solo.output
    assert_one_line_error(invoke("test", "--ckpt", tmp_path / "solo", "--member", "0"),
                          "--member 0: the checkpoint holds one model, not an ensemble")
