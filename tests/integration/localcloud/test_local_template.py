"""Template loading and CloudFormation intrinsics, offline (no moto)."""

from __future__ import annotations

from pathlib import Path

import pytest
from loraflow_local.cloud import DEFAULT_TEMPLATE
from loraflow_local.intrinsics import Deployed, Resolver, TemplateError, references
from loraflow_local.provision import check_supported
from loraflow_local.template import PLACEHOLDER_BUCKET, load_template, resolve_parameters

PSEUDO = {"AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012", "AWS::URLSuffix": "amazonaws.com"}


def _resolver(**parameters: object) -> Resolver:
    deployed = {
        "Bucket": Deployed(ref="my-bucket", attributes={"Arn": "arn:aws:s3:::my-bucket"}),
        "Fn": Deployed(
            ref="my-fn", attributes={"Arn": "arn:aws:lambda:eu-west-1:123456789012:function:my-fn"}
        ),
    }
    conditions = {"HasEmail": {"Fn::Not": [{"Fn::Equals": [{"Ref": "Email"}, ""]}]}}
    return Resolver({"Email": "", "Steps": 30, **parameters}, PSEUDO, deployed, conditions)


def test_given_sub_both_forms_when_resolved_then_refs_attributes_pseudo_and_literals_substituted():
    resolver = _resolver()
    assert resolver.resolve({"Fn::Sub": "${Bucket.Arn}/*"}) == "arn:aws:s3:::my-bucket/*"
    assert resolver.resolve(
        {"Fn::Sub": "${AWS::AccountId}.dkr.ecr.${AWS::Region}.${AWS::URLSuffix}/x:${Steps}"}
    ) == ("123456789012.dkr.ecr.eu-west-1.amazonaws.com/x:30")
    assert resolver.resolve({"Fn::Sub": ["s3://${B}/${!Literal}", {"B": {"Ref": "Bucket"}}]}) == (
        "s3://my-bucket/${Literal}"
    )


def test_given_if_with_no_value_when_condition_false_then_property_and_list_item_removed():
    resolver = _resolver()
    resolved = resolver.resolve(
        {
            "Email": {"Fn::If": ["HasEmail", {"Ref": "Email"}, {"Ref": "AWS::NoValue"}]},
            "Items": ["a", {"Fn::If": ["HasEmail", "b", {"Ref": "AWS::NoValue"}]}],
        }
    )
    assert resolved == {"Items": ["a"]}
    assert _resolver(Email="me@example.com").resolve({"Fn::If": ["HasEmail", "yes", "no"]}) == "yes"


def test_given_list_functions_when_resolved_then_join_select_split_getatt_work_together():
    resolver = _resolver()
    joined = resolver.resolve({"Fn::Join": [":", ["a", {"Fn::GetAtt": "Fn.Arn"}]]})
    assert joined == "a:arn:aws:lambda:eu-west-1:123456789012:function:my-fn"
    assert resolver.resolve({"Fn::Select": [1, {"Fn::Split": [",", "x,y,z"]}]}) == "y"
    assert resolver.resolve({"Fn::GetAtt": ["Bucket", "Arn"]}) == "arn:aws:s3:::my-bucket"


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ({"Fn::ImportValue": "shared-vpc"}, "Fn::ImportValue"),
        ({"Fn::Transform": {"Name": "x"}}, "Fn::Transform is not supported"),
        ({"Ref": "Missing"}, "Ref to 'Missing'"),
        ({"Fn::GetAtt": ["Bucket", "WebsiteURL"]}, "unknown attribute"),
    ],
)
def test_given_unsupported_or_unknown_reference_when_resolved_then_error_names_it(expression, message):
    with pytest.raises(TemplateError, match=message):
        _resolver().resolve(expression)


def test_given_sub_with_variable_map_when_collecting_references_then_map_keys_are_not_dependencies():
    value = {"Fn::Sub": ["${Name}-${Bucket.Arn}-${AWS::Region}", {"Name": {"Ref": "Fn"}}]}
    assert references(value) == {"Bucket", "AWS::Region", "Fn"}


def test_given_parameters_when_resolved_then_numbers_typed_and_constraints_enforced():
    declared = {
        "Settle": {"Type": "Number", "Default": 60, "MinValue": 0, "MaxValue": 900},
        "Kind": {
            "Type": "String",
            "Default": "ml.g5.xlarge",
            "AllowedValues": ["ml.g5.xlarge", "ml.g4dn.xlarge"],
        },
    }
    assert resolve_parameters(declared, {"Settle": "3"}) == {"Settle": 3, "Kind": "ml.g5.xlarge"}
    with pytest.raises(TemplateError, match=r"outside \[0, 900\]"):
        resolve_parameters(declared, {"Settle": "901"})
    with pytest.raises(TemplateError, match="is not one of"):
        resolve_parameters(declared, {"Kind": "ml.t2.micro"})
    with pytest.raises(TemplateError, match="Typo"):
        resolve_parameters(declared, {"Typo": "1"})


def test_given_real_template_when_loaded_then_local_paths_map_back_and_order_respects_dependencies():
    stack = load_template(DEFAULT_TEMPLATE, "us-east-1", {}, {"SettleSeconds": "3", "NotDeclared": "x"})
    assert stack.parameters["SettleSeconds"] == 3
    code = stack.resources["IngestDatasetFunction"]["Properties"]["Code"]
    assert code["S3Bucket"] == PLACEHOLDER_BUCKET
    assert (
        stack.local_path(code["S3Bucket"], code["S3Key"])
        == DEFAULT_TEMPLATE.parent / "functions" / "ingest_dataset"
    )
    order = stack.creation_order()
    assert order.index("UploadEventsQueue") < order.index("DatasetBucket")  # notification target first
    assert (
        order.index("PipelineTasksFunction")
        < order.index("TrainingPipeline")
        < order.index("IngestDatasetFunction")
    )
    assert "NotificationEmailSubscription" not in stack.resources  # its condition is false by default


def test_given_template_with_unknown_resource_type_when_checked_then_error_names_type_and_resource(
    tmp_path: Path,
):
    text = DEFAULT_TEMPLATE.read_text()
    extra = "  Network:\n    Type: AWS::EC2::VPC\n    Properties:\n      CidrBlock: 10.0.0.0/16\n\nOutputs:"
    path = tmp_path / "template.yaml"
    path.write_text(text.replace("\nOutputs:", "\n" + extra, 1))
    stack = load_template(path, "us-east-1", {})
    with pytest.raises(TemplateError, match=r"Network \(AWS::EC2::VPC\)"):
        check_supported(stack.resources)
