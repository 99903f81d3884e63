"""IngestDatasetFunction: delayed S3 upload events -> settle check -> claim -> validate -> reject or queue."""
