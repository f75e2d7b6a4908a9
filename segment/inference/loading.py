"""Networks from what a user hands `segment predict -m`: a checkpoint (read as data only, never unpickled), a model
package (model.json + safetensors) or a k-fold ensemble run, with their plan and config."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from segment.config import Config, stored_config
from segment.data.plan import Plan
from segment.errors import InputError
from segment.run_folder import RunFolder, read_checkpoint


def load_checkpoint(path: Path) -> tuple[nn.Module, Plan, Config]:
    """Network, plan and config from a checkpoint, read as data only (see `segment.run_folder.read_checkpoint`), or
    from a model package folder (`segment export`: model.json + safetensors, see `segment.inference.export`)."""
    from segment.inference.export import is_package, read_package
    from segment.nets import build_model

    if is_package(path):
        return read_package(path)
    if RunFolder(path).is_ensemble():
        raise InputError(f"{path}: is a k-fold ensemble ({len(RunFolder(path).read_ensemble()['members'])} folds); this "
                         f"needs one network: pass one fold's run folder (e.g. {Path(path) / 'fold_0'})")
    ckpt = read_checkpoint(path)
    try:
        hp = ckpt["hyper_parameters"]
        config, plan = Config.model_validate(stored_config(hp["config"])), Plan.from_dict(hp["plan"])
    except Exception as err:  # pydantic/KeyError/TypeError for a checkpoint of something else
        raise InputError(f"{path}: not a segment checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    model = build_model(config.model)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"{path}: weights do not fit the network in its config ({str(err).splitlines()[0]})") from None
    return model, plan, config


def load_models(path: Path) -> tuple[list[nn.Module], Plan, Config, RunFolder | None]:
    """The network(s) of a checkpoint, model package or k-fold ensemble run, their shared plan and config, and the run
    folder whose scan_profile.json and confidence.json apply (None for a loose .ckpt or a package)."""
    path = Path(path)
    run = RunFolder(path)
    if not run.is_ensemble():
        model, plan, config = load_checkpoint(path)
        return [model], plan, config, (RunFolder.of_checkpoint(path) if path.is_file() else None)
    models, plan, config = [], None, None
    for ckpt in run.member_checkpoints():
        model, p, c = load_checkpoint(ckpt)
        if plan is not None and p.to_dict() != plan.to_dict():
            raise InputError(f"{ckpt}: its plan differs from the other folds of {path}; an ensemble's folds must share "
                             "one plan (train them with segment train --folds)")
        models.append(model)
        plan, config = plan or p, config or c
    assert plan is not None and config is not None
    return models, plan, config, run
