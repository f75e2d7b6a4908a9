"""The `segment` command line. Heavy imports (torch, monai) happen inside commands so `--help` is instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from segment.cli.options import (
    ConfigOpt,
    DataOpt,
    SetOpt,
    config_from,
    given_flags,
    parse_devices,
    parse_skips,
    user_errors,
)
from segment.errors import SegmentError
from segment.evaluation.splits import split_help

app = typer.Typer(
    name="segment",
    help="Train a 3D U-Net on your own labelled NIfTI scans and segment new scans, with geometry you can trust.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
@user_errors
def train(
    data: DataOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="run folder (default runs/<data>-<time>)")] = None,
    max_epochs: Annotated[Optional[int], typer.Option(help="epochs (train.max_epochs)")] = None,
    max_time: Annotated[Optional[str], typer.Option(help="training-time budget (train.max_time): 30m, 2h, 90s, 1d, "
                                                         "45 (= minutes), HH:MM:SS or DD:HH:MM:SS")] = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed of split, initialisation, sampling, augmentation (seed)")] = None,
    fold: Annotated[Optional[int], typer.Option(help="k-fold split index (data.fold)")] = None,
    skips: Annotated[Optional[str], typer.Option(help="skip connections: all, none or e.g. [0,1] (model.skip_connections)")] = None,
    accelerator: Annotated[Optional[str], typer.Option(help="cpu, gpu/cuda, mps or auto (train.accelerator)")] = None,
    devices: Annotated[Optional[str], typer.Option(help="number of devices or auto (train.devices)")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="Lightning strategy, e.g. ddp (train.strategy)")] = None,
    num_nodes: Annotated[Optional[int], typer.Option(help="machines for multi-node training (train.num_nodes)")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, 32, bf16-mixed, 16-mixed (train.precision)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --output from its last checkpoint, with "
                                                          "its own config; only the options given change it")] = False,
    split: Annotated[Optional[Path], typer.Option(help="reuse a split.json (train/val case names) from another run")] = None,
    modality: Annotated[Optional[str], typer.Option(help="ct, mri or other: overrides dataset.json and CT detection (data.modality)")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="train on the cases that pass the pre-training check; list "
                                                              "the others with the reason in skipped.json (data.skip_bad)")] = False,
    folds: Annotated[Optional[int], typer.Option(help="train K models on disjoint validation folds into RUN/fold_0.. and "
                                                      "write a cross-validation table; --max-time is the total wall "
                                                      "time; several GPUs and --devices auto/1: one fold per GPU in "
                                                      "parallel; predict -m RUN averages the folds")] = None,
) -> None:
    """Train a U-Net. With no arguments, trains on the embedded demo dataset (generated on first use)."""
    if resume and output is None:
        raise SegmentError("--resume needs --output RUN_FOLDER (the run to continue)")
    if resume and (config is not None or split is not None):
        raise SegmentError("--resume continues the run with its own config.yaml and split.json: leave out "
                           f"{'--config' if config is not None else '--split'} (change single values with the options "
                           "or --set)")
    flags = {
        "data.root": data, "train.max_epochs": max_epochs, "train.max_time": max_time, "data.fold": fold,
        "model.skip_connections": parse_skips(skips), "train.accelerator": accelerator, "train.devices": parse_devices(devices),
        "train.strategy": strategy, "train.num_nodes": num_nodes, "train.precision": precision, "seed": seed,
        "data.modality": modality, "data.skip_bad": True if skip_bad else None,
    }
    cfg = config_from(config, set_, flags)
    if data is None and config is None and cfg.data.root is None and not resume:
        from segment.config import CONFIG_DIR

        if (CONFIG_DIR / "demo.yaml").is_file():  # the embedded default: demo data with a demo-sized budget
            cfg = config_from(CONFIG_DIR / "demo.yaml", set_, flags)
    from segment.config import parse_overrides
    from segment.run_folder import RunFolder
    from segment.train.runner import train as run_train

    if resume and folds is None and output is not None and RunFolder(output).is_ensemble():
        raise SegmentError(f"{output}: is a k-fold run; resume it with --folds "
                           f"{RunFolder(output).read_ensemble()['folds']} --resume -o {output}")
    if folds is not None:
        if split is not None or fold is not None:
            raise SegmentError(f"--folds {folds} makes its own k-fold splits; leave out {'--split' if split else '--fold'}")
        from segment.experiments.crossval import run_folds
        from segment.train.folds import check_folds

        check_folds(folds, folds)  # K < 2 is one line before any data is read; K > cases once the data is known
        from segment.train.parallel_folds import FoldsFailed

        try:
            run_folds(cfg, folds, output=output, resume=resume)
        except FoldsFailed as err:  # folds in parallel worker processes: the others finished; exit 1, not a user error
            from rich.console import Console

            Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        return

    from segment.run_folder import read_split_file

    # on --resume only what was given explicitly (--set, options) changes the run's own config
    given = {**parse_overrides(list(set_ or [])), **given_flags(flags)} if resume else None
    result = run_train(cfg, output=output, resume=resume, split=read_split_file(split) if split else None, given=given)
    from segment.device import global_rank

    if global_rank() == 0 and result is not None and result.last_checkpoint is not None:
        from segment.experiments.crossval import calibrate_run

        calibrate_run(result.run_dir)


@app.command()
@user_errors
def predict(
    inputs: Annotated[list[str], typer.Argument(help="scan file(s), folder(s), glob(s) or DICOM series folder(s)")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output file (one input) or folder")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="run folder or .ckpt (default: newest run in runs/)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="mirror test-time augmentation (default: the model's "
                                                                       "predict.tta)")] = None,
    overlap: Annotated[Optional[float], typer.Option(help="sliding-window overlap (0..1)")] = None,
    largest_component: Annotated[Optional[bool], typer.Option(
        "--largest-component/--all-components", help="keep the largest component per class (default: predict.largest_component)")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, 32, bf16 or 16 (default: the model's predict.precision)")] = None,
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="also write class probabilities")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace earlier outputs of segment (never other files)")] = False,
    series: Annotated[Optional[str], typer.Option(help="DICOM folder with several series: which one (UID, its start/end, or "
                                                       "the number in the listed order)")] = None,
    debug: Annotated[bool, typer.Option("--debug", "-v", help="print the traceback of a failed case")] = False,
    format_: Annotated[str, typer.Option("--format", help="nifti, dicom-seg (DICOM folders: a DICOM Segmentation "
                                                          "<case>_seg.dcm) or both: nifti,dicom-seg")] = "nifti",
) -> None:
    """Segment scans; each output has exactly its scan's shape and header."""
    from segment.inference.batch import run_predict

    code = run_predict(
        inputs, output=output, model=model, device=device, tta=tta, overlap=overlap,
        largest_component=largest_component, save_probabilities=save_probabilities, overwrite=overwrite,
        series=series, debug=debug, precision=precision, formats=format_,
    )
    raise typer.Exit(code)


@app.command()
@user_errors
def evaluate(
    model: Annotated[Path, typer.Option("--model", "-m", help="run folder or .ckpt")],
    data: Annotated[Path, typer.Option("--data", "-d", help="labelled dataset folder")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="CSV file, or an existing folder for evaluation-<split>.csv (default <run>/evaluation-<split>.csv)")] = None,
    split: Annotated[str, typer.Option(help=split_help())] = "val",
    tolerance: Annotated[Optional[float], typer.Option(help="NSD tolerance in mm")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Dice, HD95, ASSD and surface Dice (NSD) per case and class; writes a CSV and prints a summary.

    A case that cannot be read or scored is skipped with one line naming it; the others are scored (exit status 1)."""
    from segment.evaluation.evaluate import run_evaluate

    raise typer.Exit(run_evaluate(model=model, data=data, output=output, split=split, tolerance=tolerance, device=device))


@app.command()
@user_errors
def ablate(
    data: DataOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="report folder (default runs/ablation-<time>)")] = None,
    budget: Annotated[Optional[str], typer.Option(help="training time per variant and seed, e.g. 20m (default: 25m)")] = None,
    variants: Annotated[str, typer.Option(help="comma-separated skip settings (level 0 = finest, full resolution): "
                                                "all, none, only:1 (keep just level 1), drop:1 (all but level 1), "
                                                "only:0+2 (several levels), or levels = all, each level dropped alone, "
                                                "each kept alone, none; e.g. all,none,only:0")] = "all,none",
    seeds: Annotated[Optional[str], typer.Option(help="training seeds, e.g. 0,1: every variant is trained once per "
                                                      "seed and the report shows seed noise beside each effect "
                                                      "(default: the config's seed)")] = None,
) -> None:
    """Train models that differ only in their skip connections and report what that does to boundaries.

    Per-level study: segment ablate --data DIR --variants levels --seeds 0,1 --budget 3m
    (variants x seeds runs of --budget each).
    """
    from segment.experiments.ablate import run_ablation

    cfg = config_from(config, set_, {"data.root": data})
    run_ablation(cfg, output=output, budget=budget, variants=variants, seeds=seeds)


@app.command()
@user_errors
def export(
    run: Annotated[Path, typer.Argument(help="run folder or .ckpt to export")],
    output: Annotated[Path, typer.Option("--output", "-o", help="model package folder to write")],
    intended_use: Annotated[Optional[str], typer.Option(
        "--intended-use", help="intended use for the model card (default: research use; not a medical device)")] = None,
    license_: Annotated[str, typer.Option("--license", help="licence of the model, for the model card")] = "unspecified",
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="also write model.onnx (needs pip install "
                                                                "'segment[export]')")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an earlier model package in --output (never "
                                                                "other files)")] = False,
) -> None:
    """Write a portable model package: safetensors weights, model.json, a model card and an ONNX graph.

    `segment predict -m PACKAGE` uses it as it is; nothing in it is a pickle.
    """
    from segment.inference.export import check_target, export_package, is_package
    from segment.inference.loading import load_checkpoint
    from segment.run_folder import resolve_checkpoint

    check_target(output, overwrite)  # before reading a large checkpoint
    ckpt = resolve_checkpoint(run)
    if is_package(ckpt):
        raise SegmentError(f"{ckpt}: is a model package already; copy the folder to share it")
    model, plan, config = load_checkpoint(ckpt)
    meta = export_package(model, plan, config, output, source=ckpt, intended_use=intended_use, license=license_,
                          onnx=onnx, overwrite=overwrite)
    files = [meta["weights"]["file"], "model.json", "model_card.md"] + ([meta["onnx"]["file"]] if meta["onnx"] else [])
    typer.echo(f"model package: {output} ({', '.join(files)}; from {ckpt})")
    if meta["onnx"] and meta["onnx"]["max_relative_difference_to_torch"] is not None:
        typer.echo(f"onnx: opset {meta['onnx']['opset']}, input {meta['input']['shape']}; onnxruntime matches torch "
                   f"(max relative difference {meta['onnx']['max_relative_difference_to_torch']:.1e})")


@app.command("model-info")
@user_errors
def model_info(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    size: Annotated[Optional[str], typer.Option(help="input size, e.g. 64,64,64")] = None,
) -> None:
    """Print the network: parameters per stage, receptive field, output margin, kept skips."""
    from rich.console import Console

    from segment.nets import build_model, summarize

    cfg = config_from(config, set_, {})
    shape = [int(s) for s in size.split(",")] if size else None
    Console().print(summarize(build_model(cfg.model), shape))


@app.command("demo-data")
@user_errors
def demo_data(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="folder (default $SEGMENT_HOME/demo, else ~/.cache/segment/demo)")] = None,
    cases: Annotated[int, typer.Option(help="number of cases")] = 24,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing folder's contents")] = False,
) -> None:
    """Write the synthetic demo dataset (MSD layout) that `segment train` uses by default."""
    from segment.data.demo import DEFAULT_DEMO_DIR, make_demo_dataset

    path = make_demo_dataset(output or DEFAULT_DEMO_DIR, n_cases=cases, seed=seed, overwrite=overwrite)
    typer.echo(f"demo dataset: {path}")


@app.command()
@user_errors
def doctor(device: Annotated[str, typer.Option(help="device you need: auto, cpu, cuda, mps")] = "auto") -> None:
    """Versions, CUDA, GPUs, shared memory, CPUs and mixed-precision support; non-zero exit if --device is missing."""
    from segment.doctor import run_doctor

    raise typer.Exit(run_doctor(device))


if __name__ == "__main__":
    app()
