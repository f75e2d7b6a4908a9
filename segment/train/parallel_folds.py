"""k folds in parallel, one per GPU: which GPUs, the fold queue, and the worker processes that train the folds.

Rule (`gpus_for_folds`): the folds run in parallel when training resolves to CUDA, more than one GPU is visible,
`train.devices` is `auto` (not given) or 1, `train.strategy` is `auto`, `train.num_nodes` is 1 and this process is not
itself one rank of a distributed launch. Any other `--devices` (2, -1, '0,1'), a strategy or several nodes mean "each
fold on these devices through Lightning", and the folds run one after another as on one device.

`schedule` runs one worker per device; each takes the next fold not started yet until none is left, so no fold is
trained twice and a failed fold does not stop the others. The default launcher (`worker_launcher`) starts
`python -m segment.train.fold_worker RUN K k` with CUDA_VISIBLE_DEVICES set to that GPU (Lightning then sees one
device: `devices=1`) and its output in `RUN/fold_k.log` (appended to on a resume).
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from segment.config import Config
from segment.device import training_accelerator
from segment.run_folder import RunFolder

Launcher = Callable[[int, str], int]  # (fold, device id) -> exit code; blocks until the fold's process ends
# set by torchrun / Lightning's launcher, SLURM (srun -n N) and Open MPI: this process is one rank of N
_WORLD_SIZE_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


class FoldsFailed(RuntimeError):
    """One or more folds' processes ended with an error; the message names them, their logs and how to resume."""


def visible_gpu_ids() -> list[str]:
    """The CUDA_VISIBLE_DEVICES value that gives a child process exactly GPU i of this process's visible GPUs."""
    count = torch.cuda.device_count()
    given = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return given[:count] if len(given) >= count else [str(i) for i in range(count)]


def gpus_for_folds(cfg: Config) -> list[str] | None:
    """The GPUs to run one fold each on, or None for the folds one after another (see the module docstring)."""
    t = cfg.train
    if str(t.devices).strip().lower() not in ("auto", "1") or t.strategy != "auto" or t.num_nodes != 1:
        return None
    if _one_rank_of_many() or torch.cuda.device_count() < 2:
        return None
    if training_accelerator(t.accelerator) != "cuda":
        return None
    return visible_gpu_ids()


def _one_rank_of_many() -> bool:
    sizes = [os.environ.get(v, "1").strip() for v in _WORLD_SIZE_VARS]
    return "LOCAL_RANK" in os.environ or any(not s.isdigit() or int(s) > 1 for s in sizes)


def fold_log(run_dir: Path, fold: int) -> Path:
    """Where fold `fold`'s worker writes its output: beside the fold folder, which `train` needs to find empty."""
    return Path(run_dir) / f"fold_{fold}.log"


def last_error_line(log: Path) -> str:
    """The one-line reason of a failed fold: its `error:` line, else the last line of its log."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors[-1] if errors else lines[-1] if lines else "(empty log)").removeprefix("error:").strip()


def worker_command(run_dir: Path, folds: int, fold: int, per_fold_s: float | None) -> list[str]:
    """The command line of one fold's worker process."""
    budget = ["--seconds", f"{per_fold_s:.3f}"] if per_fold_s is not None else []
    return [sys.executable, "-m", "segment.train.fold_worker", str(run_dir), str(folds), str(fold), *budget]


def worker_launcher(run_dir: Path, folds: int, per_fold_s: float | None) -> Launcher:
    """Start fold k's worker on one GPU (CUDA_VISIBLE_DEVICES=device), its output in RUN/fold_k.log; wait for it."""

    def launch(fold: int, device: str) -> int:
        # rich writes a file 80 columns wide unless told otherwise: wide enough for the plan table and paths
        env = {"COLUMNS": "160", **os.environ, "CUDA_VISIBLE_DEVICES": device, "PYTHONUNBUFFERED": "1"}
        with fold_log(run_dir, fold).open("a") as log:
            return subprocess.run(worker_command(run_dir, folds, fold, per_fold_s), env=env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False).returncode

    return launch


def schedule(folds: list[int], devices: list[str], launch: Launcher,
             report: Callable[[str], None] = print, done: Callable[[int], str] = lambda k: "") -> dict[int, int]:
    """Train `folds` with one worker per device, each taking the next fold from the queue; fold -> exit code.

    `report` gets one line per fold start and end (`done(k)` adds to a finished fold's line). An exception in `launch` counts as that fold's failure (exit -1).
    """
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for k in folds:
        todo.put(k)
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def work(device: str) -> None:
        while True:
            try:
                k = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                report(f"fold {k}: started on device {device}")
            t0 = time.monotonic()
            try:
                code = launch(k, device)
            except Exception as err:  # noqa: BLE001 - a launcher problem fails this fold, not the others
                with lock:
                    report(f"fold {k}: could not start ({type(err).__name__}: {err})")
                code = -1
            with lock:
                codes[k] = code
                if code == 0:
                    report(f"fold {k}: finished on device {device} ({(time.monotonic() - t0) / 60:.1f} min)"
                           + done(k))

    threads = [threading.Thread(target=work, args=(d,), name=f"fold-worker-{d}", daemon=True) for d in devices]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return codes


def run_parallel(run_dir: Path, folds: int, todo: list[int], devices: list[str], per_fold_s: float | None,
                 launcher: Launcher | None = None, report: Callable[[str], None] = print) -> None:
    """Train the folds `todo` of the k-fold run in `run_dir` in parallel; FoldsFailed names the folds that failed."""
    launch = launcher or worker_launcher(run_dir, folds, per_fold_s)

    def best_dice(k: int) -> str:
        best = (RunFolder(run_dir).fold(k).read_summary() or {}).get("best_val_dice_mean")
        return f", best validation Dice {best:.3f}" if isinstance(best, (int, float)) else ""

    codes = schedule(todo, devices, launch, report, best_dice)
    failed = sorted(k for k, code in codes.items() if code != 0)
    for k in failed:
        member = RunFolder(run_dir).fold(k)
        # before its first checkpoint a fold folder holds only what `train` wrote at the start: cleared, so that
        # --resume starts the fold again (its log, beside the folder, is kept)
        cleared = member.path.is_dir() and not member.can_resume()
        if cleared:
            shutil.rmtree(member.path)
        report(f"fold {k}: failed (exit {codes[k]}): {last_error_line(fold_log(run_dir, k))}; "
               f"log: {fold_log(run_dir, k)}" + ("; no checkpoint yet, so its folder was removed" if cleared else ""))
    if failed:
        names = ", ".join(str(k) for k in failed)
        raise FoldsFailed(f"fold(s) {names} of {run_dir} failed (logs: {Path(run_dir) / 'fold_<k>.log'}); "
                          f"the other folds are kept: continue with segment train --folds {folds} --resume -o {run_dir}")
