"""One fold of a parallel k-fold run, in its own process: `python -m segment.train.fold_worker RUN K k [--seconds S]`.

An internal entry started by `segment.train.parallel_folds` (not a user command): it trains fold k of the k-fold run
folder RUN with the run's saved config and plan (planned once by the parent) on the one device its environment shows
(CUDA_VISIBLE_DEVICES, Lightning `devices=1`), into RUN/fold_k only. A fold with a last checkpoint continues from it.
Exit 0 when the fold finished, 2 with an `error:` line for a problem the user can act on, 1 for anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def train_one_fold(run_dir: str, folds: int, fold: int, seconds: float | None) -> None:
    from segment.config import validate
    from segment.run_folder import RunFolder
    from segment.train.folds import fold_config
    from segment.train.runner import train

    root = RunFolder(run_dir)
    cfg = root.read_config()
    raw = fold_config(cfg, folds, fold, seconds).model_dump(mode="json")
    raw["train"].update(devices=1, strategy="auto", num_nodes=1)  # the one device this process sees
    fcfg = validate(raw, f"fold {fold} config")
    member = root.fold(fold)
    if member.can_resume():
        print(f"fold {fold}: continuing from {member.last_checkpoint}", flush=True)
        train(fcfg, output=member.path, resume=True)
    else:  # the split is fold k's of the k-fold shuffle (data.folds, data.fold), as the one-after-another path makes it
        train(fcfg, output=member.path, plan=root.read_plan())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segment.train.fold_worker", description=__doc__)
    parser.add_argument("run", help="the k-fold run folder (ensemble.json, config.yaml, plan.json)")
    parser.add_argument("folds", type=int, help="K, the number of folds of the run")
    parser.add_argument("fold", type=int, help="the fold to train, 0..K-1")
    parser.add_argument("--seconds", type=float, default=None, help="this fold's time budget")
    args = parser.parse_args(argv)
    print(f"fold {args.fold} of {args.folds}: pid {os.getpid()}, "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}", flush=True)
    from segment.errors import SegmentError

    try:
        train_one_fold(args.run, args.folds, args.fold, args.seconds)
    except SegmentError as err:
        print(f"error: {err}", flush=True)
        return 2
    except Exception as err:  # noqa: BLE001 - the parent reports the last line; the traceback stays in the log
        traceback.print_exc()
        print(f"error: {type(err).__name__}: {err}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
