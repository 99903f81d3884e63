"""PipelineTasksFunction: the training state machine's Lambda steps."""
