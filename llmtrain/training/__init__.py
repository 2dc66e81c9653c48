"""Training: the LightningModule, optimizer groups and schedules, loss, and the distributed strategy."""
