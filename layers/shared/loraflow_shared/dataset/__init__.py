"""The dataset domain: folder layout, kohya config model, image header inspection, validation.

Pure logic: no boto3, no torch. Storage is reached through ``validate.ObjectReader``.
"""
