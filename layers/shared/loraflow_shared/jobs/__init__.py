"""Job lifecycle: the job record and its states, DynamoDB repository, failure mapping."""
