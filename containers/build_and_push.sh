#!/usr/bin/env bash
# Build the training and inference images, push them to ECR (creating the repositories if
# missing), then print the `sam deploy` command that points the stack at the new tag.
#
# Usage: containers/build_and_push.sh [--region REGION] [--tag TAG]
# Env:   AWS_REGION / AWS_DEFAULT_REGION, IMAGE_TAG,
#        TRAINING_REPOSITORY (default loraflow-training), INFERENCE_REPOSITORY (default loraflow-inference)
set -euo pipefail

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
}

region="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
tag="${IMAGE_TAG:-}"
training_repository="${TRAINING_REPOSITORY:-loraflow-training}"
inference_repository="${INFERENCE_REPOSITORY:-loraflow-inference}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --region) region="${2:?--region needs a value}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [[ -z "$region" ]]; then
  region="$(aws configure get region || true)"
fi
if [[ -z "$region" ]]; then
  echo "error: no AWS region: pass --region or set AWS_REGION" >&2
  exit 2
fi

if [[ -z "$tag" ]]; then
  tag="$(git rev-parse --short HEAD)"
  # A tag names a commit: images built from uncommitted changes would be mislabelled.
  if [[ -n "$(git status --porcelain)" ]]; then
    echo "warning: uncommitted changes are built into tag '$tag'; pass --tag to choose another" >&2
  fi
fi

account="$(aws sts get-caller-identity --query Account --output text)"
url_suffix="amazonaws.com"
if [[ "$region" == cn-* ]]; then
  url_suffix="amazonaws.com.cn"
fi
registry="${account}.dkr.ecr.${region}.${url_suffix}"

ensure_repository() {
  local name="$1"
  aws ecr describe-repositories --region "$region" --repository-names "$name" >/dev/null 2>&1 \
    || aws ecr create-repository --region "$region" --repository-name "$name" \
         --image-scanning-configuration scanOnPush=true >/dev/null
}

# SageMaker pulls only Docker v2 manifests: an OCI index or manifest fails CreateModel/CreateTrainingJob
# with "Unsupported manifest media type" (aws/amazon-sagemaker-feedback#180, moby/buildkit#5480).
# Current Docker pushes OCI ones: BuildKit's default provenance attestation wraps the image in an OCI
# index, and the containerd image store keeps OCI manifests that `docker push` sends as they are.
# So BuildKit pushes the image itself, without attestations, with Docker media types.
DOCKER_MANIFEST_TYPE="application/vnd.docker.distribution.manifest.v2+json"

build_and_push() {
  local component="$1" repository="$2"
  local image="${registry}/${repository}:${tag}"
  # Context is the repository root: the images copy layers/shared and containers/common.
  # SageMaker instances are x86_64, whatever this machine is.
  docker buildx build --platform linux/amd64 --provenance=false --sbom=false \
    --output "type=image,name=${image},push=true,oci-mediatypes=false" \
    -f "containers/${component}/Dockerfile" .
  # Check what ECR received, so a Docker that ignores the flags fails here and not at deploy time.
  local media_type
  media_type="$(aws ecr describe-images --region "$region" --repository-name "$repository" \
    --image-ids "imageTag=${tag}" --query 'imageDetails[0].imageManifestMediaType' --output text)"
  if [[ "$media_type" != "$DOCKER_MANIFEST_TYPE" ]]; then
    echo "error: ${image} was pushed as '${media_type}'; SageMaker needs ${DOCKER_MANIFEST_TYPE}" >&2
    exit 1
  fi
}

ensure_repository "$training_repository"
ensure_repository "$inference_repository"
aws ecr get-login-password --region "$region" | docker login --username AWS --password-stdin "$registry"

build_and_push training "$training_repository"
build_and_push inference "$inference_repository"

overrides="ImageTag=${tag}"
if [[ "$training_repository" != "loraflow-training" ]]; then
  overrides+=" TrainingRepositoryName=${training_repository}"
fi
if [[ "$inference_repository" != "loraflow-inference" ]]; then
  overrides+=" InferenceRepositoryName=${inference_repository}"
fi

echo
echo "Images pushed. Deploy them with:"
echo "  sam build && sam deploy --region ${region} --parameter-overrides ${overrides}"
