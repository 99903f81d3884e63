"""JobsApiFunction: REST API over jobs (`GET /jobs`, `GET /jobs/{job_id}`)."""
