"""Tasks: one module per application, each building its data, model and Trainer task."""
