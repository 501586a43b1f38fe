"""One LightningModule per unlearning method; each has one conf/method/<name>.yaml."""
