"""Drop-in nn.Modules built on mmcore.ops."""
