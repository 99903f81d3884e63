"""What a successful job leaves in the model dir (SageMaker tars it to `model.tar.gz`)."""

from __future__ import annotations

from pathlib import Path

from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from loraflow_diffusion.families import ModelFamily
from loraflow_shared.contracts import TrainingReport
from peft.utils import get_peft_model_state_dict

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
REPORT_NAME = "training_report.json"
ADAPTER_NAME = "default"  # what `add_adapter` names an adapter when given no name


class LoraTrainingReport(TrainingReport):
    """The shared report contract plus what this trainer knows about the run."""

    job_id: str
    base_model: str
    model_family: str
    resolution: tuple[int, int]  # (width, height)
    network_dim: int
    network_alpha: float
    learning_rate: float
    train_batch_size: int
    output_name: str
    images: int
    images_per_subset: dict[str, int]
    repeats: dict[str, int]  # per subset folder
    samples_per_epoch: int
    device: str
    dtype: str


def save_lora(pipe: DiffusionPipeline, family: ModelFamily, model_dir: Path) -> Path:
    """The UNet's LoRA in diffusers format: `pipeline.load_lora_weights(model_dir)` reads it back."""
    unet_lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    # The adapter config (rank, alpha, targets) travels in the file's metadata: without it a loader
    # assumes alpha == rank and a LoRA trained with another alpha renders at the wrong strength.
    lora_config = pipe.unet.peft_config[ADAPTER_NAME].to_dict()
    family.pipeline_class.save_lora_weights(
        model_dir,
        unet_lora_layers=unet_lora,
        weight_name=LORA_WEIGHTS_NAME,
        unet_lora_adapter_metadata=lora_config,
    )
    return model_dir / LORA_WEIGHTS_NAME


def write_report(model_dir: Path, report: LoraTrainingReport) -> Path:
    path = model_dir / REPORT_NAME
    path.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    return path
