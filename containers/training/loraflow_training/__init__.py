"""SageMaker training entrypoint: a kohya-style dataset channel in, a diffusers LoRA out.

`python -m loraflow_training [train]`; the flow reads top to bottom in `__main__.run_training`.
"""
