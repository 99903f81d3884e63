"""SageMaker async inference server rendering a job's preview images (`GET /ping`, `POST /invocations`)."""
