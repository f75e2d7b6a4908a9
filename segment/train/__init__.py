"""Training: the LightningModule and the `segment train` runner."""
