"""The host side of running a bundle on a device: devices, preflight and run, the bench report."""
