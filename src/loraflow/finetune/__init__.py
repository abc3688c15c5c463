"""Fine-tuning: data sets to examples, the training loop, many tenants in one job."""
