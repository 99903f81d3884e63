"""What a training job cost: SageMaker's billed seconds times the stack's price table.

SageMaker reports `TrainingTimeInSeconds` and `BillableTimeInSeconds` in DescribeTrainingJob (the
`.sync` task's output, and the cause of a failed one). Billable time is what is charged at the
instance's on-demand rate, per instance; with managed spot it is below the training time, which is
how the spot savings show (SageMaker Developer Guide, "Managed Spot Training").
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraflow_shared.jobs.model import Cost

PriceTable = Mapping[str, float]


class _ResourceConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    instance_type: str = Field(default="", alias="InstanceType")
    instance_count: int = Field(default=1, alias="InstanceCount")


class TrainingJobDescription(BaseModel):
    """The fields of DescribeTrainingJob loraflow reads; SageMaker adds fields over time."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    training_job_name: str = Field(alias="TrainingJobName")
    resource_config: _ResourceConfig = Field(default_factory=_ResourceConfig, alias="ResourceConfig")
    training_seconds: int | None = Field(default=None, alias="TrainingTimeInSeconds")
    billable_seconds: int | None = Field(default=None, alias="BillableTimeInSeconds")
    spot: bool = Field(default=False, alias="EnableManagedSpotTraining")


def parse_price_table(text: str) -> dict[str, float]:
    """`ml.g5.2xlarge=1.515,ml.g5.xlarge=1.408` (USD per instance-hour) -> a dict; blank entries ignored."""
    table: dict[str, float] = {}
    for entry in filter(None, (item.strip() for item in text.split(","))):
        instance_type, separator, price = entry.partition("=")
        try:
            value = float(price)
        except ValueError:
            value = math.nan
        if not separator or not instance_type.startswith("ml.") or not math.isfinite(value) or value < 0:
            raise ValueError(f"price table entry {entry!r} is not ml.<type>=<USD per hour>")
        table[instance_type.strip()] = value
    return table


def training_cost(description: TrainingJobDescription, prices: PriceTable) -> Cost | None:
    """The job's billed time and estimated price; None before SageMaker reported any billed time."""
    if description.billable_seconds is None:
        return None
    resources = description.resource_config
    price = prices.get(resources.instance_type)
    estimate = None
    if price is not None:
        instance_hours = description.billable_seconds * resources.instance_count / 3600
        estimate = round(instance_hours * price, 4)
    return Cost(
        instance_type=resources.instance_type,
        instance_count=resources.instance_count,
        training_seconds=description.training_seconds or description.billable_seconds,
        billable_seconds=description.billable_seconds,
        spot=description.spot,
        price_per_hour_usd=price,
        estimated_usd=estimate,
    )


def total_cost(costs: list[Cost | None]) -> float | None:
    """The estimated price of several training jobs (a job's attempts); None when none is known."""
    known = [cost.estimated_usd for cost in costs if cost is not None and cost.estimated_usd is not None]
    return round(sum(known), 4) if known else None


def failed_training_cost(cause: str, prices: PriceTable) -> Cost | None:
    """The cost of a failed `.sync` training task, whose cause is the job's DescribeTrainingJob JSON;
    None for any other cause (a Lambda error, a timeout, a rejected request)."""
    if not cause.lstrip().startswith("{"):
        return None
    try:
        description = TrainingJobDescription.model_validate_json(cause)
    except ValidationError:
        return None
    return training_cost(description, prices)
