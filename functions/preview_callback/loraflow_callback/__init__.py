"""PreviewCallbackFunction: async endpoint success/error notifications -> SendTaskSuccess/SendTaskFailure."""
