"""`python -m loraflow_training [train]`: SageMaker runs the image with `train`; exit 1 on any failure."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

from loraflow_diffusion.device import pick_device, pick_dtype
from loraflow_diffusion.families import family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.sagemaker_env import TrainingPaths

from loraflow_training.data import load_images, scan_dataset
from loraflow_training.failure import problem_for, write_failure
from loraflow_training.outputs import LoraTrainingReport, save_lora, write_report
from loraflow_training.settings import Hyperparameters, read_config
from loraflow_training.train import train_lora

DATASET_CHANNEL = "dataset"

logger = logging.getLogger("loraflow_training")


def run_training(paths: TrainingPaths) -> LoraTrainingReport:
    started = time.monotonic()
    hyperparameters = Hyperparameters.from_paths(paths)
    dataset_dir = paths.channel(DATASET_CHANNEL)
    parsed = read_config(dataset_dir, hyperparameters.config_file)
    config = parsed.config
    training_set = scan_dataset(dataset_dir)
    pixels = load_images(dataset_dir, training_set.samples, config.resolution)
    logger.info("%d images, %d samples per epoch", len(training_set.samples), len(training_set.epoch()))

    device = pick_device()
    dtype = pick_dtype(device, config.mixed_precision)
    pipe = load_pipeline(
        hyperparameters.base_model, device=device, dtype=dtype, cache_dir=paths.model_cache_dir
    )
    family = family_of(pipe)
    captions = [sample.caption for sample in training_set.samples]
    outcome = train_lora(pipe, family, pixels, captions, training_set.epoch(), config)

    paths.model_dir.mkdir(parents=True, exist_ok=True)
    save_lora(pipe, family, paths.model_dir)
    report = LoraTrainingReport(
        steps=outcome.steps,
        final_loss=outcome.final_loss,
        seconds=round(time.monotonic() - started, 3),
        ignored_keys=parsed.ignored_keys,
        job_id=hyperparameters.job_id,
        base_model=hyperparameters.base_model,
        model_family=family.name,
        resolution=config.resolution,
        network_dim=config.network_dim,
        network_alpha=config.network_alpha,
        learning_rate=config.learning_rate,
        train_batch_size=config.train_batch_size or 1,  # unpinned: batch 1 (no memory plan yet)
        output_name=config.output_name,
        images=len(training_set.samples),
        images_per_subset=training_set.images_by_subset(),
        repeats=training_set.repeats_by_subset(),
        samples_per_epoch=len(training_set.epoch()),
        device=device.type,
        dtype=str(dtype).removeprefix("torch."),
    )
    write_report(paths.model_dir, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["train"]):
        print("usage: python -m loraflow_training [train]", file=sys.stderr)
        return 2
    paths = TrainingPaths.from_env()
    try:
        report = run_training(paths)
    except Exception as exc:
        logger.exception("training failed")  # the trace goes to the logs; the failure file gets one line
        write_failure(paths.failure_file, problem_for(exc))
        return 1
    logger.info(
        "training done: %d steps, final loss %s, %.1f s", report.steps, report.final_loss, report.seconds
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
