"""Acceleration applied from outside the models: step caching (``cache``), its calibration
(``calibrate``) and regional ``torch.compile`` (``compile``). docs/acceleration.md has the measurements."""
