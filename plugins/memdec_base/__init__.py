"""The ``base`` method: the unadapted model, the row every other method is compared with."""
