"""`medpose` argument parsing: options and KEY=VALUE overrides (and predict's inputs) mix in any order."""
import pytest

from launch.cli import _parser, main


def _parse(*argv):
    return _parser().parse_args(list(argv))


def test_train_options_between_overrides():
    args = _parse("train", "--config", "X", "a=b", "--no-test", "c=d")
    assert args.command == "train" and args.config == "X"
    assert args.no_test is True and args.resume is None
    assert args.overrides == ["a=b", "c=d"]


def test_train_overrides_first_options_last_and_repeated_runs():
    args = _parse("train", "a=1", "--resume", "auto", "b=2", "c=3", "--config", "hip_demo", "d=4")
    assert (args.config, args.resume, args.no_test) == ("hip_demo", "auto", False)
    assert args.overrides == ["a=1", "b=2", "c=3", "d=4"]
    assert _parse("train").overrides == [] and _parse("train").config == "hip_demo"


def test_eval_overrides_around_its_options():
    args = _parse("eval", "eval.flip_test=true", "--checkpoint", "c.pt", "data.format=table", "--split", "val",
                  "x.y=1")
    assert (args.checkpoint, args.split, args.config, args.data_root) == ("c.pt", "val", None, None)
    assert args.overrides == ["eval.flip_test=true", "data.format=table", "x.y=1"]


def test_predict_inputs_around_its_options():
    args = _parse("predict", "a.png", "--checkpoint", "c.pt", "b.png", "--out", "preds", "--skip-bad", "dir/")
    assert (args.checkpoint, args.out, args.skip_bad, args.batch_size) == ("c.pt", "preds", True, 8)
    assert args.inputs == ["a.png", "b.png", "dir/"]


def test_other_commands_with_overrides():
    args = _parse("pretrain", "pretrain.steps=5", "--out", "o", "model.name=unet")
    assert (args.out, args.overrides) == ("o", ["pretrain.steps=5", "model.name=unet"])
    args = _parse("data", "to-coco", "a=1", "--config", "xray_demo", "b=2", "--out", "o")
    assert (args.config, args.out, args.overrides) == ("xray_demo", "o", ["a=1", "b=2"])
    args = _parse("data", "inspect", "my_data", "a=1", "--format", "coco", "b=2")
    assert (args.root, args.format, args.overrides) == ("my_data", "coco", ["a=1", "b=2"])
    args = _parse("models", "unet_pp", "base=32", "--hw", "128", "96", "deep=true")
    assert (args.name, args.hw, args.model_args) == ("unet_pp", [128, 96], ["base=32", "deep=true"])
    assert _parse("demo", "a=1", "b=2").overrides == ["a=1", "b=2"]


@pytest.mark.parametrize("argv,message", [
    (["train", "--bogus", "a=b"], "unrecognized arguments: --bogus"),
    (["eval", "a=b"], "required: --checkpoint"),
    (["predict", "--checkpoint", "c.pt", "--out", "o"], "required: inputs"),
])
def test_parse_errors_still_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(*argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_train_command_gets_intermixed_overrides_and_flag(monkeypatch):
    """Through main(): the resolved config carries both overrides, --no-test turns the final test off (the training
    itself is replaced by a recorder)."""
    import engine.run
    seen = {}

    def fake_train(cfg, resume=None, final_test=True, **other):
        seen.update(cfg=cfg, resume=resume, final_test=final_test)
        return {"step": 0}
    monkeypatch.setattr(engine.run, "train", fake_train)
    assert main(["train", "--config", "hip_demo", "train.max_steps=7", "--no-test", "optim.lr=0.125",
                 "--resume", "auto", "log.name=mixed"]) == 0
    cfg = seen["cfg"]
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.log.name) == (7, 0.125, "mixed")
    assert seen["final_test"] is False and seen["resume"] == "auto"
