"""Diffusion code shared by the training and inference containers.

Model loading (any supported reference), model-family specifications (SD 1.5 now, SDXL next),
device/dtype choice, SageMaker's path contract and a tiny SD pipeline builder for tests and the
local cloud. Imports torch and diffusers: never imported by the Lambda functions.
"""
