"""Reading-worklist priority (policy) and notification of the result."""
